"""Container engines using drove: the Docker (and Podman) volume plugin."""
