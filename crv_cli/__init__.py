"""The `crv` command and the background daemons it starts (`crv up`)."""
