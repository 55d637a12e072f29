"""The service's routes, one router per caller: `public` (anyone: health, the agent program, the
CA and CRLs, and joining with a token, a PIN or a last certificate), `node` (an agent, by its
node certificate) and `admin` (crv's own clients, by the admin certificate)."""
