"""`python -m deployments`: serve the deployments (what `crv up` runs in the background)."""

from deployments.serve import serve

if __name__ == "__main__":
    serve()
