"""HTTP routers, one module per resource; they parse, call one service and return a schema."""
