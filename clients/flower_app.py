"""The fedmem ClientApp as a deployed SuperNode loads it (see ``fedmem.server.flower_app``).

The node config, set by ``fedmem-client join``, says where the corpus is (``data``),
which base model to use (``base``) and where to keep received memories (``state``).
"""

from .client_app import make_client_app

app = make_client_app()
