"""Demo adapters for a first run: small, honest LoRAs trained here from handwritten examples."""
