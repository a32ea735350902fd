/*
 * pal_device.h - the device (responder) side of a PALISADE CORE session in portable C99.
 *
 * A microcontroller behind a serial line terminates the tunnel itself: it answers a
 * ClientHello with a ServerHello (fragmented to the link MTU, retransmitted on timers scaled
 * to the baud rate), verifies the ClientFinished, derives the keys, and then seals and opens
 * encrypted packets with header protection, a replay window and server-authoritative epoch
 * rekeying. docs/protocol.md is the specification; the Python implementation (palisade_c) is
 * the reference peer, and the two agree byte for byte (firmware_bridge/vectors/).
 *
 * Constraints: C99, freestanding; no malloc, no global mutable state; only <stdint.h>,
 * <stddef.h> and <string.h>. Every primitive goes through pal_crypto.h. One pal_device
 * context per session, in memory the caller provides. No clock: every call that can move
 * time takes `now` in milliseconds from any monotonic source (it may start at 0 at boot).
 *
 * Sans-IO calling convention (the same as palisade_c.connection.Connection):
 *
 *     pal_device_init(&dev, &cfg, now);
 *     for (;;) {
 *         on a datagram from pal_link:     pal_device_input(&dev, buf, len, now);
 *         then, until it returns 0:        n = pal_device_output(&dev, now, out, sizeof out);
 *                                          (send out[0..n) as one datagram through pal_link)
 *         when now >= the deadline of      pal_device_next_deadline(&dev, &deadline):
 *                                          pal_device_handle_timer(&dev, now); then output
 *         events:                          while (pal_device_poll_event(&dev, &ev)) ...
 *         application data:                pal_device_send(&dev, stream, data, len, now,
 *                                                          out, sizeof out, &n); send out
 *     }
 *
 * Nothing here is reentrant per context: call it from one task (not from an ISR; the ISR
 * feeds pal_link, see DEVICE.md). A hostile or malformed datagram never makes a call fail:
 * it is dropped and counted (pal_device_drops), or the session closes with a spec error code.
 */
#ifndef PAL_DEVICE_H
#define PAL_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "pal_crypto.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- build-time sizes ------------------------------------------------------------------- */

/* Largest handshake message the device reassembles (a ClientFinished is 4403 bytes, a CORE
 * ClientHello about 3.2 KiB). Larger messages are dropped and counted. */
#ifndef PAL_DEVICE_MAX_MESSAGE
#define PAL_DEVICE_MAX_MESSAGE 4608u
#endif
/* Replay window in packets (docs/protocol.md §4: 64..4096, 1024 by default). */
#ifndef PAL_DEVICE_REPLAY_WINDOW
#define PAL_DEVICE_REPLAY_WINDOW 1024u
#endif
/* Ring of bits behind the window: a power of two of 64-bit words, at least one word more
 * than the window (the spare word lets it slide by whole words). */
#if PAL_DEVICE_REPLAY_WINDOW <= 64u
#define PAL_DEVICE_REPLAY_WORDS 2u
#elif PAL_DEVICE_REPLAY_WINDOW <= 192u
#define PAL_DEVICE_REPLAY_WORDS 4u
#elif PAL_DEVICE_REPLAY_WINDOW <= 448u
#define PAL_DEVICE_REPLAY_WORDS 8u
#elif PAL_DEVICE_REPLAY_WINDOW <= 960u
#define PAL_DEVICE_REPLAY_WORDS 16u
#elif PAL_DEVICE_REPLAY_WINDOW <= 1984u
#define PAL_DEVICE_REPLAY_WORDS 32u
#elif PAL_DEVICE_REPLAY_WINDOW <= 4096u
#else
#error "use a window of at most 1984 packets, or extend this table"
#endif
/* Times the device arms and announces one epoch before the rekey fails with
 * ErrorRekeyTimeout (docs/protocol.md §9, REKEY_ATTEMPTS of the Python core). */
#define PAL_DEVICE_REKEY_ATTEMPTS 4u
/* Pending application events. */
#define PAL_DEVICE_EVENT_QUEUE 8u
/* Smallest datagram size that carries a PALISADE handshake (docs/protocol.md §14). */
#define PAL_DEVICE_MIN_MTU 256u
#define PAL_DEVICE_RID_LEN 24u
#define PAL_DEVICE_MAX_REASON 64u
/* Bytes an encrypted packet adds around its payload: 45 of headers, 16 of tag. */
#define PAL_DEVICE_PACKET_OVERHEAD 61u

/* ---- configuration ---------------------------------------------------------------------- */

typedef struct pal_device_config {
    void *port;                   /* passed to every pal_crypto_* call */
    const uint8_t *identity_pk;   /* ML-DSA-65 public key, 1952 bytes (the certificate) */
    const uint8_t *identity_sk;   /* the port's form of the private key */
    size_t identity_sk_len;
    /* Pinned client keys: SHA3-256 fingerprints of their raw ML-DSA-65 public keys. */
    const uint8_t (*pinned)[32];
    size_t pinned_count;
    uint8_t node_id[8];           /* RID steering prefix (the gateway routes on it) */
    uint8_t has_node_id;          /* 0: keep the client's prefix instead (docs/protocol.md §8.4) */
    uint32_t mtu;                 /* datagram size of the link, PAL_DEVICE_MIN_MTU..65535 */
    uint32_t link_bps;            /* line speed in bit/s; 0 = fast link (no airtime scaling) */
    /* Timers in milliseconds; 0 selects the default in brackets (docs/protocol.md). */
    uint32_t initial_rto_ms;      /* [300] */
    uint32_t max_rto_ms;          /* [8000] */
    uint32_t handshake_timeout_ms;/* [15000] plus twice a handshake's airtime */
    uint32_t idle_timeout_ms;     /* [60000] */
    uint32_t keepalive_ms;        /* [15000] */
    uint32_t close_drain_ms;      /* [1000] */
    uint32_t rekey_after_ms;      /* [120000] key age that starts a rekey */
    uint32_t rekey_retransmit_ms; /* [500] */
    uint32_t max_transition_ms;   /* [2000] */
    uint32_t commit_threshold;    /* [16] key_phase 0 packets on the new epoch to commit */
    uint64_t rekey_after_bytes;   /* [2^34] */
} pal_device_config;

/* ---- events ----------------------------------------------------------------------------- */

enum {
    PAL_EV_NONE = 0,
    PAL_EV_HANDSHAKE_DONE = 1, /* keys installed; pin_index names the client's pin */
    PAL_EV_DATA = 2,           /* stream, data, len: valid until the next pal_device_input */
    PAL_EV_EPOCH = 3,          /* both directions now use `epoch` */
    PAL_EV_CLOSED = 4          /* code, by_peer, reason (NUL-terminated, in the context) */
};

typedef struct pal_device_event {
    uint8_t type;
    uint8_t stream;
    uint8_t by_peer;
    uint16_t code;
    uint32_t epoch;
    uint32_t pin_index;
    const uint8_t *data;
    size_t len;
    const char *reason;
} pal_device_event;

/* ---- states and counters ---------------------------------------------------------------- */

enum {
    PAL_DEV_LISTEN = 0,      /* waiting for the first ClientHello fragment */
    PAL_DEV_WAIT_CH,         /* reassembling the ClientHello */
    PAL_DEV_WAIT_FIN,        /* ServerHello sent, waiting for ClientFinished */
    PAL_DEV_ESTABLISHED,
    PAL_DEV_CLOSING,         /* soft close: draining for close_drain_ms */
    PAL_DEV_CLOSED,
    PAL_DEV_N_STATES
};

enum { /* drop counters, pal_device_drop_name() gives the name shared with Python */
    PAL_DROP_TRUNCATED = 0,
    PAL_DROP_BAD_MAGIC,
    PAL_DROP_BAD_VERSION,
    PAL_DROP_RESERVED_BITS,
    PAL_DROP_BAD_LENGTH,
    PAL_DROP_UNKNOWN_RID,
    PAL_DROP_BAD_PADDING,
    PAL_DROP_KEY_PHASE,
    PAL_DROP_EPOCH,
    PAL_DROP_REPLAY,
    PAL_DROP_AEAD,
    PAL_DROP_HS_MALFORMED,
    PAL_DROP_HS_TOO_LARGE,
    PAL_DROP_UNEXPECTED_HS,
    PAL_DROP_STALE_ACK,
    PAL_DROP_NO_KEYS,
    PAL_DROP_CLOSED,
    PAL_DROP_MALFORMED_CONTROL,
    PAL_DROP_IGNORED_CONTROL,
    PAL_DROP_UNEXPECTED_REKEY,
    PAL_DROP_RESEND_SUPPRESSED,
    PAL_DROP_RESUME_REFUSED,
    PAL_DROP_ILLEGAL_EVENT,
    PAL_DROP_N
};

/* ---- the context (treat every field as private) ------------------------------------------ */

typedef struct pal_tkey {
    uint32_t epoch;
    uint8_t live;
    uint8_t key[32];
    uint8_t iv[12];
} pal_tkey;

typedef struct pal_replay {
    uint64_t bits[PAL_DEVICE_REPLAY_WORDS];
    uint64_t top;
    uint8_t empty;
} pal_replay;

typedef struct pal_device {
    pal_device_config cfg;
    uint8_t state;
    uint8_t rid_set;
    uint8_t rid[PAL_DEVICE_RID_LEN];        /* session RID (after SH) */
    uint8_t hello_rid[PAL_DEVICE_RID_LEN];  /* the client's first-flight RID */
    uint32_t rng_state;                     /* jitter only (xorshift), seeded from the port */

    /* reassembly of the one message being received (CH, then CF) */
    uint8_t r_active, r_done, r_type, r_seq, r_nfrag;
    uint32_t r_len, r_held;
    uint8_t r_map[PAL_DEVICE_MAX_MESSAGE / 8u + 1u];
    uint8_t r_buf[PAL_DEVICE_MAX_MESSAGE];
    uint32_t ch_len;                        /* length of the CH answered (repeats check it) */
    uint32_t cf_len;
    uint8_t cf_seq;

    /* handshake secrets and the ServerHello kept for retransmission */
    uint8_t h_live;
    pal_sha3_ctx h;                         /* SHA3-256 over CH* || SH* (then || CF*) */
    uint8_t client_nonce[32];
    uint8_t client_pk[PAL_MLDSA65_PK_BYTES];
    uint32_t pin_index;
    uint8_t ss_c[32];
    uint8_t sh_head[39];                    /* version, choices, server nonce */
    uint8_t ks_pk[PAL_MLKEM768_PK_BYTES];
    uint8_t ks_sk[PAL_MLKEM768_SK_BYTES];
    uint8_t ct_c[PAL_MLKEM768_CT_BYTES];
    uint8_t sh_sig[PAL_MLDSA65_SIG_BYTES];

    /* the SH flight: which records still go out, which the client acknowledged */
    uint32_t sh_nrec;
    uint64_t sh_to_send;
    uint64_t sh_acked;
    uint64_t flight_deadline, flight_sent_at, flight_started_at;
    uint32_t rto, rto_floor;
    uint8_t flight_running, attempts;
    uint64_t hs_deadline;
    uint64_t ack_deadline;                  /* delayed ack of a partial message */
    uint8_t cf_ack_pending;
    uint64_t amp_in, amp_out;
    uint8_t amp_validated;

    /* record layer and epochs (docs/protocol.md §3-§5) */
    uint8_t hp_tx[32], hp_rx[32];
    uint8_t secret[32];                     /* current epoch secret (wiped when stepped) */
    pal_tkey rx_cur, rx_next, tx_cur, tx_pending;
    pal_replay win_cur, win_next;
    uint8_t rx_state, tx_state;
    uint8_t next_seen;                      /* a packet authenticated on the armed epoch */
    uint8_t secret_ahead;                   /* `secret` is the armed epoch's (abandoned) */
    uint64_t tx_seq;
    uint32_t packets_on_next, phase0_on_next;
    uint32_t transition_ms;                 /* T: bound of TRANSITION from arming (§5.1) */
    uint64_t armed_at;

    /* session */
    uint64_t last_recv, last_send, epoch_started, epoch_bytes;
    int64_t rekey_next;                     /* -1: no rekey running */
    uint64_t rekey_deadline, rekey_started;
    uint32_t rekey_interval;
    uint8_t rekey_attempt;                  /* 1..PAL_DEVICE_REKEY_ATTEMPTS (§9) */
    uint32_t reported_epoch;
    uint8_t pend_announce, pend_rekey_ack, pend_close_answer, pend_keepalive;
    uint32_t pend_rekey_ack_epoch;
    uint64_t drain_deadline, close_resend_at;
    uint8_t close_by_peer;
    uint16_t close_code;
    char close_reason[PAL_DEVICE_MAX_REASON + 1u];
    uint8_t close_reason_len;
    uint8_t last[160];                      /* a final datagram: ErrorResponse or hard close */
    uint16_t last_len;

    pal_device_event events[PAL_DEVICE_EVENT_QUEUE];
    uint8_t ev_head, ev_count;

    uint32_t drops[PAL_DROP_N];
    uint32_t packets_in, packets_out;
} pal_device;

/* ---- API -------------------------------------------------------------------------------- */

/* Start listening. Returns 0, or -1 for a configuration the device cannot run with. */
int pal_device_init(pal_device *d, const pal_device_config *cfg, uint64_t now);
/* One datagram from the link. The device may overwrite buf (packets are decrypted in place);
 * a DATA event points into it until the next call. */
void pal_device_input(pal_device *d, uint8_t *buf, size_t len, uint64_t now);
/* The next datagram to send, written to out (cap must be at least the MTU); 0 when none. */
size_t pal_device_output(pal_device *d, uint64_t now, uint8_t *out, size_t cap);
/* 1 and *deadline when a timer is armed, else 0. */
int pal_device_next_deadline(const pal_device *d, uint64_t *deadline);
void pal_device_handle_timer(pal_device *d, uint64_t now);
/* 1 and *ev filled when an event was pending, else 0. */
int pal_device_poll_event(pal_device *d, pal_device_event *ev);
/* Seal `len` bytes on `stream` (0..253) into out. Returns 0, or -1 when not established,
 * -2 when the packet would not fit in min(cap, mtu), -3 when the sequence is exhausted. */
int pal_device_send(pal_device *d, uint8_t stream, const uint8_t *data, size_t len,
                    uint64_t now, uint8_t *out, size_t cap, size_t *out_len);
/* Soft close with a code and a reason of reason_len bytes of UTF-8 (cut to 64 at a character
 * boundary; NULL for none). 0, or -1 when there is nothing to close. */
int pal_device_close(pal_device *d, uint16_t code, const char *reason, size_t reason_len,
                     uint64_t now);
/* Start a rekey now (the device is authoritative). 0, or -1 when one cannot start now. */
int pal_device_rekey(pal_device *d, uint64_t now);
/* Erase every secret and release port state. The context is CLOSED afterwards. */
void pal_device_wipe(pal_device *d);

int pal_device_state(const pal_device *d);
const char *pal_device_state_name(int state);
const char *pal_device_drop_name(int reason);
uint32_t pal_device_epoch(const pal_device *d);

/* ---- building blocks shared with the known-answer tests --------------------------------- */

/* HKDF over HMAC-SHA3-256 with label("...") info; out_len <= 64. */
int pal_device_hkdf_expand(void *port, const uint8_t prk[32], const uint8_t *info,
                           size_t info_len, uint8_t *out, size_t out_len);
/* master secret from the KEM secrets, nonces and transcript hash (docs/protocol.md §2). */
int pal_device_master_secret(void *port, const uint8_t ss_c[32], const uint8_t ss_s[32],
                             const uint8_t client_nonce[32], const uint8_t server_nonce[32],
                             const uint8_t th[32], uint8_t master[32]);
/* Install the record layer from a master secret and a RID as after a handshake (tests and
 * vectors; a firmware never needs it). */
int pal_device_install_master(pal_device *d, const uint8_t master[32], const uint8_t rid[24],
                              uint64_t now);
/* Derive and install the next epoch on both halves at once (vectors only). */
int pal_device_step_epoch_for_test(pal_device *d);

#ifdef __cplusplus
}
#endif

#endif /* PAL_DEVICE_H */
