"""The fine-tuning entrypoint: `kiln train` makes LoRA / QLoRA adapters (PEFT folders) and
follows the SageMaker training contract. See kiln/train/main.py."""
