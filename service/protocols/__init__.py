"""The inference protocols other front ends speak: the Open Inference Protocol (KServe v2,
as Triton speaks it), parsed and answered by pure functions."""
