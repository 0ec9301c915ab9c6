"""The sampling server and playground page (launch/serve.py): batcher.py batches concurrent requests
into one cached generate call, app.py is the FastAPI app (the page and the JSON API)."""
