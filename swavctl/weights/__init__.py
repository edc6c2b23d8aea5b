"""Weight files: safetensors validation and I/O, the pickle policy, checkpoints, exports,
loading a model, the official checkpoint import and ``pretrain --init``."""
