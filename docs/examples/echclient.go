// echclient fetches https://NAME/ through an ECH front with Go's crypto/tls
// and says whether the front accepted ECH. Standard library only (Go >= 1.24).
//
//	go run echclient.go -ech BASE64_ECHCONFIGLIST -ca ca.pem \
//	    -connect 127.0.0.1:8443 -name private.localhost
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
)

func main() {
	echList := flag.String("ech", "", "ECHConfigList in base64, as printed by echfront")
	caFile := flag.String("ca", "", "PEM file of the CA to trust (default: system roots)")
	connect := flag.String("connect", "", "host:port of the front (default: NAME:443)")
	name := flag.String("name", "private.localhost", "the private server name")
	flag.Parse()

	list, err := base64.StdEncoding.DecodeString(*echList)
	if err != nil || len(list) == 0 {
		log.Fatalf("-ech: need a base64 ECHConfigList (%v)", err)
	}
	config := &tls.Config{
		MinVersion:                     tls.VersionTLS13, // ECH needs TLS 1.3
		EncryptedClientHelloConfigList: list,
	}
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			log.Fatal(err)
		}
		config.RootCAs = x509.NewCertPool()
		config.RootCAs.AppendCertsFromPEM(pem)
	}
	transport := &http.Transport{TLSClientConfig: config}
	if *connect != "" {
		transport.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, *connect)
		}
	}
	response, err := (&http.Client{Transport: transport}).Get("https://" + *name + "/")
	var rejected *tls.ECHRejectionError
	if errors.As(err, &rejected) {
		// The hello was not decrypted; the server authenticated as the public
		// name and may have sent newer configs to retry with.
		fmt.Println("ECH rejected; retry configs:", base64.StdEncoding.EncodeToString(rejected.RetryConfigList))
		os.Exit(1)
	}
	if err != nil {
		log.Fatal(err)
	}
	defer response.Body.Close()
	body, _ := io.ReadAll(response.Body)
	fmt.Println("ECH accepted:", response.TLS.ECHAccepted)
	fmt.Println(response.Status)
	fmt.Println(string(body))
}
