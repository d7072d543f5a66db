"""CollabEdit as a Flower app: ``client_app`` (one organisation), ``server_app`` (the round loop
of ``collab.rounds`` over messages, ``exchange``; SecAgg+ in ``secagg``), ``task`` (the work on
a node, no Flower). This folder is also what ``flwr run`` deploys: its ``pyproject.toml`` names
the apps and holds the run settings' defaults. The only part of ``fedit.collab`` that imports
Flower."""

from fedit.extras import require

require("flwr", "collab")  # every module in this folder runs on Flower: the [collab] extra
