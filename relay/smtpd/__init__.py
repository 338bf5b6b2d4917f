"""The SMTP front door. Nothing outside this package imports aiosmtpd's server."""
