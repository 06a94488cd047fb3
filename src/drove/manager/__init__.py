"""The manager: state, placement, healing, REST API."""
