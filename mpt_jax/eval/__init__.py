"""Evaluation: the scoring core (scoring: batched, bucketed continuation log-probabilities;
generation: completion until stop sequences), llm-foundry's in-context-learning tasks (tasks:
task files and prompts; icl: running them, metrics, tables; gauntlet: the composite score),
perplexity by context length (perplexity), the lm-evaluation-harness backend (harness), and
checkpoint + tokenizer loading (loading). `eval.py` is the command line over them."""
