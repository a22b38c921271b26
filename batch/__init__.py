"""`segserve batch`: a data set segmented as a job, one output per input, a Parquet manifest,
resumable; on Ray Data across a cluster, or in this process (inputs.py, manifest.py,
worker.py, engines.py, job.py)."""
