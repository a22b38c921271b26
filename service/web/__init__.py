"""The HTTP front end: middleware, the client's body and head, error handlers, the OpenAPI
description, the routes and the page's static files. Thin: every request's work is the
pipeline's (segserve.service.pipeline)."""
