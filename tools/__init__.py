"""Developer tools: schema.sql generation and the fake n8n server."""
