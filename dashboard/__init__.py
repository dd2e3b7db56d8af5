"""The operator dashboard the coordinator serves at ``/`` (see ``routes.router``)."""
