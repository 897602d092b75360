"""Evaluation: the scoring core (scoring: batched, bucketed continuation log-probabilities;
generation: greedy completion until stop sequences), llm-foundry's in-context-learning tasks
(tasks: task files and prompts; icl: running them, metrics; gauntlet: the composite score),
perplexity by context length (perplexity), the lm-evaluation-harness backend (harness) and the
`eval.py` command line (cli)."""
