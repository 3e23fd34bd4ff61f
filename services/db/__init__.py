"""Tables, sessions and migrations of the service database."""
