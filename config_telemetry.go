package main

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"

	"github.com/serverless-fabric/flux-agent/telemetry"
)

// TelemetryConfig says where traces and metrics go. The standard OTEL_*
// environment variables apply as well.
type TelemetryConfig struct {
	OTLPEndpoint   string       `yaml:"otlp_endpoint"`
	OTLPProtocol   OTLPProtocol `yaml:"otlp_protocol"`
	OTLPInsecure   bool         `yaml:"otlp_insecure"`
	MetricsPush    bool         `yaml:"metrics_push"`
	MetricsAddress string       `yaml:"metrics_address"`
}

func defaultTelemetryConfig() TelemetryConfig {
	return TelemetryConfig{MetricsAddress: telemetry.DefaultMetricsAddress}
}

func (t TelemetryConfig) validate() []error {
	var errs []error
	if a := t.MetricsAddress; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			errs = append(errs, keyError("metrics_address", "%q is not host:port (empty disables it)", a))
		}
	}
	return errs
}

// OTLPProtocol is telemetry.otlp_protocol: one of the protocols the
// telemetry package exports with, or "" to leave the choice to
// OTEL_EXPORTER_OTLP_PROTOCOL.
type OTLPProtocol string

// UnmarshalText implements encoding.TextUnmarshaler.
func (p *OTLPProtocol) UnmarshalText(text []byte) error {
	switch s := strings.TrimSpace(string(text)); s {
	case "", telemetry.ProtocolGRPC, telemetry.ProtocolHTTPProtobuf:
		*p = OTLPProtocol(s)
		return nil
	}
	return fmt.Errorf("%q must be %s or %s", text, telemetry.ProtocolGRPC, telemetry.ProtocolHTTPProtobuf)
}

// telemetryConfig is the telemetry section in the telemetry package's
// terms, with what describes this agent in every span and metric.
func (c *Config) telemetryConfig(version, host string, logger *slog.Logger) telemetry.Config {
	return telemetry.Config{
		ServiceVersion: version,
		AgentID:        c.AgentID,
		HostName:       host,
		OTLPEndpoint:   c.Telemetry.OTLPEndpoint,
		OTLPProtocol:   string(c.Telemetry.OTLPProtocol),
		OTLPInsecure:   c.Telemetry.OTLPInsecure,
		MetricsPush:    c.Telemetry.MetricsPush,
		Logger:         logger,
	}
}

// LogConfig sets the structured log's shape.
type LogConfig struct {
	Format LogFormat `yaml:"format"`
	Level  LogLevel  `yaml:"level"`
	// File, when set, receives the log instead of stderr (a Windows
	// service has no stderr anyone reads).
	File string `yaml:"file"`
}

func defaultLogConfig() LogConfig {
	return LogConfig{Format: telemetry.LogFormatJSON, Level: "info"}
}

func (l LogConfig) validate() []error {
	var errs []error
	// Values set in code skip UnmarshalText; the same rules apply.
	if err := new(LogFormat).UnmarshalText([]byte(l.Format)); err != nil {
		errs = append(errs, keyError("format", "%v", err))
	}
	if err := new(LogLevel).UnmarshalText([]byte(l.Level)); err != nil {
		errs = append(errs, keyError("level", "%v", err))
	}
	return errs
}

// newLogger is the logger log.format and log.level ask for, writing to w.
func (l LogConfig) newLogger(w io.Writer) (*slog.Logger, error) {
	return telemetry.NewLogger(w, string(l.Format), string(l.Level))
}

// LogFormat is log.format: telemetry.LogFormatJSON or LogFormatText.
type LogFormat string

// UnmarshalText implements encoding.TextUnmarshaler, by the rule
// telemetry.NewLogger applies (any case; empty is JSON).
func (f *LogFormat) UnmarshalText(text []byte) error {
	switch s := strings.ToLower(strings.TrimSpace(string(text))); s {
	case "", telemetry.LogFormatJSON:
		*f = telemetry.LogFormatJSON
		return nil
	case telemetry.LogFormatText:
		*f = telemetry.LogFormatText
		return nil
	}
	return fmt.Errorf("%q must be %s or %s", text, telemetry.LogFormatJSON, telemetry.LogFormatText)
}

// LogLevel is log.level, as telemetry.ParseLevel reads it; it holds the
// level's canonical name (debug, info, warn, error).
type LogLevel string

// UnmarshalText implements encoding.TextUnmarshaler.
func (l *LogLevel) UnmarshalText(text []byte) error {
	lvl, err := telemetry.ParseLevel(string(text))
	if err != nil {
		return fmt.Errorf("%q must be debug, info, warn or error", text)
	}
	*l = LogLevel(strings.ToLower(lvl.String()))
	return nil
}
