package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// TLSConfig turns on mutual TLS: Flux's CA signs both sides.
type TLSConfig struct {
	Enabled  bool   `yaml:"enabled"`
	CACert   string `yaml:"ca_cert"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

func (t TLSConfig) validate() []error {
	if !t.Enabled {
		return nil
	}
	var errs []error
	for _, f := range []struct{ key, path string }{{"ca_cert", t.CACert}, {"cert_file", t.CertFile}, {"key_file", t.KeyFile}} {
		if f.path == "" {
			errs = append(errs, keyError(f.key, "must be set when tls.enabled is true"))
		}
	}
	return errs
}

// TLSServerConfig is the mTLS setup Flux expects: our certificate, a
// required client certificate signed by the CA, TLS 1.2+, ALPN h2 (set by
// grpc's credentials).
func (c *Config) TLSServerConfig() (*tls.Config, error) {
	certPEM, err := os.ReadFile(c.TLS.CertFile)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file: %w", err)
	}
	keyPEM, err := os.ReadFile(c.TLS.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls.key_file: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file %s with tls.key_file %s: %w", c.TLS.CertFile, c.TLS.KeyFile, err)
	}
	caPEM, err := os.ReadFile(c.TLS.CACert)
	if err != nil {
		return nil, fmt.Errorf("tls.ca_cert: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("tls.ca_cert: %s holds no PEM certificate", c.TLS.CACert)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{"h2"},
	}, nil
}
