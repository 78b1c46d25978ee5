"""Training for the demo model: data, tokenizer, the dense MDM loss and step-causal SFT (Algorithm 1), eval."""
