"""`keystore serve`: the admin HTTP API (api.py, JSON under /api/v1/) and the web console
(the console/ package), one FastAPI app (app.py) over keystore/service.py's AdminService, served by
uvicorn (serve.py). Importing this package loads nothing heavy: site.py is used by the
relay's config checks."""
