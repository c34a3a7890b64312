"""Schemathesis hooks for castellum's contract test (tests/contract.rs).

DER bodies are not JSON: requests to POST /ocsp are drawn as bytes (random, and real OCSP
requests), and DER answers are parsed with `cryptography` (not the engine's code), so an answer
that is not the CRL, certificate or OCSP response its content type says fails the run.
"""

import base64

import schemathesis
from cryptography import x509
from cryptography.x509 import ocsp
from hypothesis import strategies as st

# A well-formed OCSP request (for serial 1 of an unknown issuer), and random bytes.
_ONE_REQUEST = base64.b64decode(
    "MEIwQDA+MDwwOjAJBgUrDgMCGgUABBSqPBmWHUcjhQpjuKqTSJjlb52WXQQUqjwZlh1HI4UKY7iqk0iY5W+dll0CAQE="
)
schemathesis.openapi.media_type(
    "application/ocsp-request", st.one_of(st.just(_ONE_REQUEST), st.binary(max_size=256))
)


def _checked(parse, response):
    parse(response.content)
    # The description says a string of bytes: what was parsed, as text.
    return response.content.hex()


@schemathesis.deserializer("application/pkix-crl")
def crl(ctx, response):
    return _checked(x509.load_der_x509_crl, response)


@schemathesis.deserializer("application/pkix-cert")
def certificate(ctx, response):
    return _checked(x509.load_der_x509_certificate, response)


@schemathesis.deserializer("application/ocsp-response")
def ocsp_response(ctx, response):
    return _checked(ocsp.load_der_ocsp_response, response)
