// Command flannel-cni-conf writes a node's CNI config from flanneld's subnet.env.
//
// Real clusters install flannel's CNI plugin (/opt/cni/bin/flannel), which at
// every pod ADD reads /run/flannel/subnet.env and delegates to the bridge
// plugin with host-local IPAM. That plugin's Go module is refused by the module
// proxy our test rig can reach, so instead this program writes, once per
// subnet.env change, the conflist the plugin would have delegated to:
//
//	bridge (cni0, isGateway, isDefaultGateway, hairpinMode, ipMasq = !FLANNEL_IPMASQ,
//	        mtu = FLANNEL_MTU, ipam host-local: ranges = FLANNEL_SUBNET,
//	        routes = FLANNEL_NETWORK)
//	portmap (portMappings)
//
// isDefaultGateway and hairpinMode come from the delegate block of upstream's
// kube-flannel.yml cni-conf.json; isGateway, ipMasq, mtu and the ipam block are
// what the flannel plugin adds (github.com/flannel-io/cni-plugin, flannel_linux.go
// doCmdAdd / getDelegateIPAM). Like the plugin, the subnet is written as its
// network address (host-local refuses host bits), while subnet.env carries the
// gateway address (10.244.1.1/24).
//
// It polls subnet.env every second, rewrites the conflist atomically (temp file
// + rename in the same directory) whenever the wanted content differs from
// what is on disk, runs until SIGTERM/SIGINT and then exits 0. Only the
// standard library is used.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// subnetEnv is what flanneld writes to /run/flannel/subnet.env
// (pkg/subnet/subnet.go WriteSubnetFile).
type subnetEnv struct {
	Networks []*net.IPNet // FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK
	Subnets  []*net.IPNet // FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, as network addresses
	MTU      int
	IPMasq   bool
}

// parseSubnetEnv parses subnet.env text. Like the flannel CNI plugin it
// requires FLANNEL_MTU, FLANNEL_IPMASQ and, per address family, a network and a
// subnet (at least one family).
func parseSubnetEnv(text string) (subnetEnv, error) {
	var env subnetEnv
	kv := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return env, fmt.Errorf("malformed line %q", line)
		}
		kv[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	if err := sc.Err(); err != nil {
		return env, err
	}

	cidrs := func(key string) ([]*net.IPNet, error) {
		var out []*net.IPNet
		for _, s := range strings.Split(kv[key], ",") {
			if s = strings.TrimSpace(s); s == "" {
				continue
			}
			_, n, err := net.ParseCIDR(s) // masks host bits, as the plugin does
			if err != nil {
				return nil, fmt.Errorf("%s: %w", key, err)
			}
			out = append(out, n)
		}
		return out, nil
	}
	families := 0
	for _, fam := range [][2]string{{"FLANNEL_NETWORK", "FLANNEL_SUBNET"}, {"FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET"}} {
		nws, err := cidrs(fam[0])
		if err != nil {
			return env, err
		}
		sns, err := cidrs(fam[1])
		if err != nil {
			return env, err
		}
		switch {
		case len(nws) == 0 && len(sns) == 0:
			continue
		case len(nws) == 0:
			return env, fmt.Errorf("%s set without %s", fam[1], fam[0])
		case len(sns) != 1:
			return env, fmt.Errorf("%s must be one CIDR (got %q)", fam[1], kv[fam[1]])
		}
		families++
		env.Networks = append(env.Networks, nws...)
		env.Subnets = append(env.Subnets, sns[0])
	}
	if families == 0 {
		return env, errors.New("no FLANNEL_NETWORK/FLANNEL_SUBNET (nor IPv6) in subnet.env")
	}

	mtu, ok := kv["FLANNEL_MTU"]
	if !ok {
		return env, errors.New("missing FLANNEL_MTU")
	}
	n, err := strconv.Atoi(mtu)
	if err != nil || n <= 0 {
		return env, fmt.Errorf("bad FLANNEL_MTU %q", mtu)
	}
	env.MTU = n

	masq, ok := kv["FLANNEL_IPMASQ"]
	if !ok {
		return env, errors.New("missing FLANNEL_IPMASQ")
	}
	if env.IPMasq, err = strconv.ParseBool(masq); err != nil {
		return env, fmt.Errorf("bad FLANNEL_IPMASQ %q", masq)
	}
	return env, nil
}

type rangeEntry struct {
	Subnet string `json:"subnet"`
}

type route struct {
	Dst string `json:"dst"`
}

type ipam struct {
	Type    string         `json:"type"`
	Ranges  [][]rangeEntry `json:"ranges"`
	Routes  []route        `json:"routes"`
	DataDir string         `json:"dataDir"`
}

type bridgePlugin struct {
	Type             string `json:"type"`
	Bridge           string `json:"bridge"`
	IsGateway        bool   `json:"isGateway"`
	IsDefaultGateway bool   `json:"isDefaultGateway"`
	HairpinMode      bool   `json:"hairpinMode"`
	IPMasq           bool   `json:"ipMasq"`
	MTU              int    `json:"mtu"`
	IPAM             ipam   `json:"ipam"`
}

type portmapPlugin struct {
	Type         string          `json:"type"`
	Capabilities map[string]bool `json:"capabilities"`
}

type conflist struct {
	CNIVersion string `json:"cniVersion"`
	Name       string `json:"name"`
	Plugins    []any  `json:"plugins"`
}

// renderConflist returns the conflist for env: the bridge config the flannel
// plugin delegates to, then portmap, as in upstream's kube-flannel.yml.
func renderConflist(env subnetEnv, cniVersion string) ([]byte, error) {
	if len(env.Subnets) == 0 {
		return nil, errors.New("no subnet")
	}
	br := bridgePlugin{
		Type:             "bridge",
		Bridge:           "cni0",
		IsGateway:        true,
		IsDefaultGateway: true,
		HairpinMode:      true,
		IPMasq:           !env.IPMasq, // flanneld masquerades itself with --ip-masq
		MTU:              env.MTU,
		IPAM: ipam{
			Type:    "host-local",
			DataDir: "/var/lib/cni/networks",
		},
	}
	for _, sn := range env.Subnets {
		br.IPAM.Ranges = append(br.IPAM.Ranges, []rangeEntry{{Subnet: sn.String()}})
	}
	for _, nw := range env.Networks {
		br.IPAM.Routes = append(br.IPAM.Routes, route{Dst: nw.String()})
	}
	cl := conflist{
		CNIVersion: cniVersion,
		Name:       "cbr0",
		Plugins: []any{
			br,
			portmapPlugin{Type: "portmap", Capabilities: map[string]bool{"portMappings": true}},
		},
	}
	b, err := json.MarshalIndent(cl, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// writeAtomic replaces path with data via a temp file in the same directory
// (named so that CNI loaders, which pick *.conf/*.conflist/*.json, skip it).
func writeAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// syncOnce brings confFile in line with subnetFile. It returns whether it
// wrote, and an error only for problems worth logging (a missing subnet.env is
// the normal state before flanneld has a lease: errNotYet).
var errNotYet = errors.New("subnet.env not there yet")

func syncOnce(subnetFile, confFile, cniVersion string) (bool, error) {
	raw, err := os.ReadFile(subnetFile)
	if errors.Is(err, fs.ErrNotExist) {
		return false, errNotYet
	}
	if err != nil {
		return false, err
	}
	env, err := parseSubnetEnv(string(raw))
	if err != nil {
		return false, fmt.Errorf("%s: %w", subnetFile, err)
	}
	want, err := renderConflist(env, cniVersion)
	if err != nil {
		return false, err
	}
	if have, err := os.ReadFile(confFile); err == nil && bytes.Equal(have, want) {
		return false, nil
	}
	if err := writeAtomic(confFile, want); err != nil {
		return false, err
	}
	return true, nil
}

func main() {
	subnetFile := flag.String("subnet-file", "/run/flannel/subnet.env", "flanneld's subnet.env to read")
	confFile := flag.String("conf-file", "/etc/cni/net.d/10-flannel.conflist", "CNI conflist to write")
	cniVersion := flag.String("cni-version", "0.3.1", "cniVersion of the conflist")
	interval := flag.Duration("interval", time.Second, "how often to re-read subnet.env")
	once := flag.Bool("once", false, "write the conflist once subnet.env is valid, then exit")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.LUTC)
	log.SetPrefix("flannel-cni-conf: ")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Printf("watching %s, writing %s (cniVersion %s)", *subnetFile, *confFile, *cniVersion)

	t := time.NewTicker(*interval)
	defer t.Stop()
	lastErr := ""
	for {
		wrote, err := syncOnce(*subnetFile, *confFile, *cniVersion)
		switch {
		case err != nil:
			if msg := err.Error(); msg != lastErr { // log each distinct problem once
				log.Print(msg)
				lastErr = msg
			}
		case wrote:
			lastErr = ""
			log.Printf("wrote %s", *confFile)
		default:
			lastErr = ""
		}
		if *once && err == nil {
			return
		}
		select {
		case <-ctx.Done():
			log.Print("signal received, exiting")
			return
		case <-t.C:
		}
	}
}
