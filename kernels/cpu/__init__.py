"""The CPU fast paths: the step's plans (``lora_plan``, ``attention_plan``), the torch backend's
kernels (``twins``) and the native C kernels (``native``; sources in ``c/``, built by ``build``)."""
