"""Model-family code shared by the MiniCPM engines: the typed config and its Hugging Face config.json reader and
writer (config.py, hf_config.py), the RoPE / LongRoPE tables (rope.py), the fold to a plain Llama checkpoint
(hf_fold.py) and the fresh-weight rule (init.py). Each engine keeps its presets, model and parallel layout."""
