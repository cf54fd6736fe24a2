"""The CPU fast paths: the native C kernels (``native``; sources in ``c/``, built by ``build``) over
the step's plan (``lora_plan``), and the torch attention (``attention``, by ``attention_plan``)."""
