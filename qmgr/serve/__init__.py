"""Serving the cataloged models to other programs over TCP, in the APIs they already speak
(Ollama's; OpenAI's next): ``qmgr serve``, or ``listen`` in the configuration."""
