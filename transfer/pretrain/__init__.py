"""MoCo v1 / v2 self-supervised pre-training (moco.py: the method; engine.py: the training loop)."""
