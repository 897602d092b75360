"""MPT-7B-Instruct: llm-foundry's MPT-7B Dolly SFT recipe
(scripts/train/yamls/finetune/mpt-7b_dolly_sft.yaml) on mosaicml/dolly_hhrlhf.

    python -m mpt_jax.data.prepare --format prompt_response --template none \
        --input dolly_hhrlhf/train.jsonl --output /data/ft/dolly_hhrlhf \
        --tokenizer MPT7B_DIR --max_seq_len 2048
    python train.py --config configs/mpt7b_instruct.py:MPT7B_DIR --workdir runs/mpt7b_instruct

MPT7B_DIR is MPT-7B in HF layout (config.json + safetensors, e.g. mosaicml/mpt-7b downloaded)
or converted (convert_torch.py import). dolly_hhrlhf's prompts already carry the instruct
template ("Below is an instruction ...\\n\\n### Instruction:\\n...\\n\\n### Response:\\n"): prepare
it with --template none; raw instructions take --template instruct. Change the data with
--config.data.sources.dolly_hhrlhf.path=DIR.

Where each number comes from (the yaml, llm-foundry at 8c8dd48, 2025; the recipe dates from
May 2023):
  model           pretrained mosaicml/mpt-7b, config_overrides max_seq_len 2048,
                  attn_uses_sequence_id false (its packing_ratio is commented out: no packing)
  optimizer       decoupled_adamw lr 5.0e-6, betas (0.9, 0.999), eps 1e-8, weight_decay 0
  schedule        linear_decay_with_warmup, t_warmup 50ba, alpha_f 0
  clipping        gradient_clipping norm 1.0
  batch           global_train_batch_size 48; device_train_microbatch_size 8
  duration        max_duration 2ep; eval_interval 1ep
  precision       amp_bf16, FSDP FULL_SHARD with PURE mixed precision, activation
                  checkpointing: bf16 compute, fp32 params, full remat here
  seed            17 (variables.global_seed)
  data            train split, decoder_only_format, allow_pad_trimming false, shuffle, drop_last
Steps: dolly_hhrlhf's train split has 59,310 rows (its dataset card); with every 20th held out
for evaluation (data.eval_fraction 0.05) 56,345 train, 1,173 batches of 48 an epoch (drop_last),
2 epochs = 2,346 steps. Deviation: llm-foundry evaluates on the dataset's test split (5,129
rows); we hold out part of train. Evaluated before training (eval.first, llm-foundry's
eval_first) and every epoch. Micro-batch 6 (not 8): it divides the 48 / n rows per device
for n = 1, 2, 4, 8.
"""
import ml_collections

from configs.base import data_section, get_base_config

DOLLY_HHRLHF_TRAIN_ROWS = 59_310
EVAL_FRACTION = 0.05
GLOBAL_BATCH = 48
EPOCHS = 2


def get_config(init_from: str = "", data_root: str = "/data/ft"):
    c = get_base_config("7b")
    c.seed = 17
    c.train.init_from = init_from
    c.model.max_seq_len = 2048
    c.model.attn_config.attn_uses_sequence_id = False
    c.train.seq_len = 2048
    c.train.global_batch_size = GLOBAL_BATCH
    c.train.micro_batch_size = 6
    c.train.compute_dtype = "bfloat16"
    c.train.param_dtype = "float32"
    c.train.remat_policy = "full"
    c.optim.name = "decoupled_adamw"
    c.optim.lr = 5.0e-6
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 0.0
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 50
    c.optim.alpha_f = 0.0
    c.optim.clip_norm = 1.0
    train_rows = DOLLY_HHRLHF_TRAIN_ROWS - DOLLY_HHRLHF_TRAIN_ROWS // round(1 / EVAL_FRACTION)
    steps_per_epoch = train_rows // GLOBAL_BATCH
    c.max_steps = EPOCHS * steps_per_epoch
    c.eval_every = steps_per_epoch
    c.checkpoint_every = steps_per_epoch
    c.log_every = 1  # console_log_interval 1ba
    c.eval.batch_size = 64
    c.eval.num_batches = 16
    c.eval.first = True
    c.loss_spike.enabled = False  # a finetune's first steps move fast; llm-foundry's yaml has none
    c.data = data_section(
        sources={"dolly_hhrlhf": ml_collections.ConfigDict(
            dict(path=f"{data_root}/dolly_hhrlhf", weight=1.0))},
        packing=False, eval_fraction=EVAL_FRACTION, num_workers=8)
    return c
