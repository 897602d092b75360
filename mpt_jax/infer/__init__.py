"""Inference: prefill + KV-cache decoding."""
