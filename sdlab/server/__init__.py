"""`sdlab serve`: AUTOMATIC1111's HTTP API and sdlab's own job API over the pipelines.

    catalog.py   the models a server may load: one given model, or the files and folders of --models-dir
    jobs.py      the job queue and its worker thread (one job at a time on the loaded model)
    codec.py     base64 images in, PNG bytes out
    a1111.py     /sdapi/v1/...: AUTOMATIC1111's request and response shapes
    v1.py        /v1/...: sdlab's typed job API with Server-Sent Events
    app.py       the FastAPI application: auth, limits, errors, the web page at /

Only app.py, a1111.py and v1.py import FastAPI (the `server` extra); the rest of sdlab never imports this package.
"""
