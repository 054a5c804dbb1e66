"""n8n chat relay: teams chat with their n8n agents through a streaming, persistent API."""
