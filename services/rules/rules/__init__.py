"""Rules service: turns purchases and engagement into points commands."""
