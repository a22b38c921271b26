"""What runs the networks: onnxruntime sessions and their providers (engine, providers), the
served versions and their lifecycle (registry), and giving memory back (memory)."""
