"""Transport security and identities: TLS files and rotation, principals, the policy, the interceptor.

Below the runtime in the layers (settings and runtime import it); see docs/security.md.
"""
