"""Operating the platform from above its services: the `loyalty` CLI composes them; no service imports it."""
