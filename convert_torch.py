"""Convert MPT weights between HF / llm-foundry safetensors and mpt_jax checkpoints.

    python convert_torch.py import SRC DST [--dtype bf16|fp16|fp32] [--quantize none|int8]
    python convert_torch.py quantize SRC DST [--quantize int8]
    python convert_torch.py export SRC DST [--dtype ...] [--max_shard_size GB]

`import --quantize int8` and `quantize` write weight-only int8 checkpoints (model/quant.py;
one tensor at a time); `export` of one writes its dequantized weights.

See mpt_jax/convert/convert.py for the formats. Bad input: exit status 1 with one line on stderr.
"""
import sys

from mpt_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
