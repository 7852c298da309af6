"""Thin HTTP routers: parse, authorize, call the serving layer, shape the answer."""
