"""FedEdit as a Flower app: ``client_app`` (one organisation), ``server_app`` (the time slots),
``task`` (the work on a node, no Flower). This folder is also what ``flwr run`` deploys: its
``pyproject.toml`` names the apps and holds the run settings' defaults."""
