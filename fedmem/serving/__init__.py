"""``fedmem serve``: the memory behind an OpenAI-compatible HTTP endpoint.

- ``engines``: a model ready to answer (the base model, or one version of the memory merged
  into it), and how a memory version is loaded and named;
- ``batcher``: one worker that batches concurrent requests into ``model.generate`` calls, sends
  the memory's requests through the memory gate (``fedmem.memory_gate``) first, and streams each
  row's tokens back to its request;
- ``follow``: watching a memory directory and swapping to each new, verified version;
- ``openai_api``: the FastAPI routes (``/v1/chat/completions``, ``/v1/models``, ``/health``).
"""
