"""FedEdit as a Flower app: ``client_app`` (one organisation), ``server_app`` (the time slots),
``task`` (the work on a node, no Flower). This folder is also what ``flwr run`` deploys: its
``pyproject.toml`` names the apps and holds the run settings' defaults."""

from fedit.extras import require

require("flwr", "fed")  # every module in this folder runs on Flower: the [fed] extra
