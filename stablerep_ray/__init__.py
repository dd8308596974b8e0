"""stablerep-ray."""
