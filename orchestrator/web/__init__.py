"""The dashboard: its page, its charts and its templates."""
