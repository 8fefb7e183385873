package main

// echtest replay-client / replay-backend: a cheap load for a split-mode
// front, for benchmarks/scalebench.py.
//
// A real ECH handshake costs the Go client and the Go backend about 2.5
// times what it costs the front, so on a small machine the load, not the front,
// uses the CPUs: a front with several workers cannot be given a core each.
// These two tools replay recorded bytes instead.  The client sends one of
// a set of real ClientHelloOuter flights (captured from `echtest client`
// with ECH, so the front decrypts each with HPKE as it would a live one),
// and then follows a fixed script with the backend: the backend reads the
// ClientHelloInner the front forwards (whole records, up to the end of the
// handshake message), answers with canned bytes that start with a
// ServerHello, and the two exchange the script's further records, as a TLS
// 1.3 handshake and a short exchange would, before both close.  The front
// does all of its per-connection work (accept, decode, route, connect,
// the HelloRetryRequest watch, relaying, half-close); the load costs a few
// socket calls per connection.
//
// The script file (JSON) holds hex strings: "answers" are what the backend
// writes (the first after the ClientHello, then one after each client
// message), "client" what the client writes after each answer but the
// last; each side checks what it reads after the ClientHello against the
// script, so a front that garbles or reorders relayed bytes fails the run.
// The flights file is a JSON list of hex strings.

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// replayScript is the exchange after the ClientHello.
type replayScript struct {
	Answers [][]byte
	Client  [][]byte
}

func init() {
	if len(os.Args) >= 2 {
		switch os.Args[1] {
		case "replay-client":
			os.Exit(runReplayClient(os.Args[2:]))
		case "replay-backend":
			os.Exit(runReplayBackend(os.Args[2:]))
		}
	}
}

func readHexList(path string) ([][]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var texts []string
	if err := json.Unmarshal(raw, &texts); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := make([][]byte, len(texts))
	for i, text := range texts {
		if out[i], err = hex.DecodeString(text); err != nil {
			return nil, fmt.Errorf("%s item %d: %w", path, i, err)
		}
	}
	return out, nil
}

func loadScript(path string) (*replayScript, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var texts struct {
		Answers []string `json:"answers"`
		Client  []string `json:"client"`
	}
	if err := json.Unmarshal(raw, &texts); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(texts.Answers) == 0 || len(texts.Client) != len(texts.Answers)-1 {
		return nil, fmt.Errorf("%s: want n answers and n-1 client messages", path)
	}
	script := &replayScript{}
	for _, text := range texts.Answers {
		b, err := hex.DecodeString(text)
		if err != nil {
			return nil, err
		}
		script.Answers = append(script.Answers, b)
	}
	for _, text := range texts.Client {
		b, err := hex.DecodeString(text)
		if err != nil {
			return nil, err
		}
		script.Client = append(script.Client, b)
	}
	return script, nil
}

func runReplayBackend(args []string) int {
	fs := flag.NewFlagSet("replay-backend", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	scriptPath := fs.String("script", "", "the exchange (JSON, see replay.go)")
	timeout := fs.Duration("timeout", 30*time.Second, "per-connection bound")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	script, err := loadScript(*scriptPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "replay-backend:", err)
		return 2
	}
	ln, err := listenAnnounced(*listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "replay-backend:", err)
		return 1
	}
	var failures atomic.Int64
	for {
		conn, err := ln.Accept()
		if err != nil {
			break
		}
		go func() {
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(*timeout))
			if err := serveReplay(conn, script); err != nil && failures.Add(1) <= 20 {
				stdout.write(map[string]any{"error": err.Error()})
			}
		}()
	}
	return 0
}

func serveReplay(conn net.Conn, script *replayScript) error {
	if _, _, err := readClientHello(conn); err != nil {
		return fmt.Errorf("ClientHello: %w", err)
	}
	for i, answer := range script.Answers {
		if _, err := conn.Write(answer); err != nil {
			return fmt.Errorf("answer %d: %w", i, err)
		}
		if i < len(script.Client) {
			got := make([]byte, len(script.Client[i]))
			if _, err := io.ReadFull(conn, got); err != nil {
				return fmt.Errorf("client message %d: %w", i, err)
			}
			if !bytes.Equal(got, script.Client[i]) {
				return fmt.Errorf("client message %d differs from the script", i)
			}
		}
	}
	// The client's FIN, relayed by the front; then ours.
	if n, err := conn.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		return fmt.Errorf("want the client's FIN, got %d bytes (%v)", n, err)
	}
	return nil
}

// replaySummary is the line replay-client prints at the end.
type replaySummary struct {
	Summary bool           `json:"summary"`
	OK      int            `json:"ok"`
	Failed  int            `json:"failed"`
	Errors  map[string]int `json:"errors"`
	WallS   float64        `json:"wall_s"`
	P50Ms   *float64       `json:"p50_ms"`
	P99Ms   *float64       `json:"p99_ms"`
}

func runReplayClient(args []string) int {
	fs := flag.NewFlagSet("replay-client", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port of the front")
	flightsPath := fs.String("flights", "", "ClientHello flights (JSON list of hex)")
	scriptPath := fs.String("script", "", "the exchange (JSON, see replay.go)")
	count := fs.Int("count", 1, "connections")
	concurrency := fs.Int("concurrency", 1, "connections in flight")
	rate := fs.Float64("rate", 0, "connections started per second (0: as fast as -concurrency allows)")
	timeout := fs.Duration("timeout", 30*time.Second, "per-connection bound")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	script, err := loadScript(*scriptPath)
	if err == nil && *addr == "" {
		err = errors.New("-addr is required")
	}
	var flights [][]byte
	if err == nil {
		flights, err = readHexList(*flightsPath)
	}
	if err == nil && (len(flights) == 0 || *count < 1 || *concurrency < 1) {
		err = errors.New("need flights, and -count and -concurrency of at least 1")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "replay-client:", err)
		return 2
	}
	var (
		mu      sync.Mutex
		errs    = map[string]int{}
		samples []float64
		wg      sync.WaitGroup
	)
	// Connections start at -rate per second (all at once without), at most
	// -concurrency in flight: a closed loop when the front is slower.
	slots := make(chan struct{}, *concurrency)
	started := time.Now()
	for i := 0; i < *count; i++ {
		if *rate > 0 {
			if wait := time.Until(started.Add(time.Duration(float64(i) / *rate * float64(time.Second)))); wait > 0 {
				time.Sleep(wait)
			}
		}
		slots <- struct{}{}
		wg.Add(1)
		go func(flight []byte) {
			defer func() { <-slots; wg.Done() }()
			began := time.Now()
			err := replayOnce(*addr, flight, script, *timeout)
			took := float64(time.Since(began)) / float64(time.Millisecond)
			mu.Lock()
			if err != nil {
				errs[err.Error()]++
			} else {
				samples = append(samples, took)
			}
			mu.Unlock()
		}(flights[i%len(flights)])
	}
	wg.Wait()
	sort.Float64s(samples)
	failed := 0
	for _, n := range errs {
		failed += n
	}
	stdout.write(replaySummary{
		Summary: true, OK: len(samples), Failed: failed, Errors: errs,
		WallS: time.Since(started).Seconds(),
		P50Ms: percentile(samples, 50), P99Ms: percentile(samples, 99),
	})
	return 0
}

func replayOnce(addr string, flight []byte, script *replayScript, timeout time.Duration) error {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(flight); err != nil {
		return fmt.Errorf("ClientHello: %w", err)
	}
	for i, answer := range script.Answers {
		got := make([]byte, len(answer))
		if _, err := io.ReadFull(conn, got); err != nil {
			return fmt.Errorf("answer %d: %w", i, err)
		}
		if !bytes.Equal(got, answer) {
			return fmt.Errorf("answer %d differs from the script", i)
		}
		if i < len(script.Client) {
			if _, err := conn.Write(script.Client[i]); err != nil {
				return fmt.Errorf("client message %d: %w", i, err)
			}
		}
	}
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	if n, err := conn.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		return fmt.Errorf("want the backend's FIN, got %d bytes (%v)", n, err)
	}
	return nil
}
