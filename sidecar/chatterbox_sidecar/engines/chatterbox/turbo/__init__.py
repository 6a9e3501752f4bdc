"""Chatterbox-Turbo: its GPT-2 T3 (model, tokenizer, batched backend) and meanflow S3Gen."""
