/*
 * pal_device.c - the device (server) side of a PALISADE CORE session. See pal_device.h.
 *
 * Section numbers (§) refer to docs/protocol.md, which this file follows rule by rule; the
 * Python implementation in pyx/palisade_c/ is the reference it is tested against.
 */
#include "pal_device.h"

#include <string.h>

/* ---- constants (§3, §8) ------------------------------------------------------------------- */

#define VERSION 0x12u
#define HS_HEADER 30u
#define HS_OVERHEAD 39u                 /* record header + fragment header */
#define PUB_HEADER 30u
#define HEADER_LEN 45u
#define TAG_LEN 16u
#define MIN_PACKET 61u

#define MSG_CH 1u
#define MSG_SH 2u
#define MSG_CF 3u
#define MSG_CHR 4u
#define MSG_CFR 6u
#define MSG_RETRY 0x7Du
#define MSG_ACK 0x7Eu
#define MSG_ERROR 0x7Fu
#define MAX_HS_MESSAGE 16384u           /* §8.4 */
#define MAX_FRAGMENTS 64u
#define ACK_MAX_RANGES 16u

#define FLAG_CONTROL 0x01u
#define FLAG_KEY_PHASE 0x04u
#define FLAGS_RESERVED 0xFAu
#define STREAM_KEEPALIVE 0xFEu
#define STREAM_DUMMY 0xFFu

#define CTRL_REKEY 0x01u
#define CTRL_CLOSE 0x03u
#define REKEY_ANNOUNCE 0u
#define REKEY_REQUEST 1u
#define REKEY_ACK 2u
#define MAX_FRAMES 16u

#define KEM_MLKEM768 0x0011u
#define SIG_MLDSA65 0x0021u
#define AEAD_CHACHA 0x0001u
#define EXT_PLUS 0x0001u
#define EXT_IGNORABLE 0x8000u

#define E_INVALID_VERSION 0x0100u
#define E_UNSUPPORTED_KEM 0x0101u
#define E_UNSUPPORTED_SIG 0x0102u
#define E_UNSUPPORTED_AEAD 0x0103u
#define E_INVALID_CH 0x0104u
#define E_SIG_VERIFY 0x0106u
#define E_CERT_INVALID 0x0107u
#define E_KEM_DECAP 0x0108u
#define E_INVALID_CF 0x0109u
#define E_HS_TIMEOUT 0x010Au
#define E_UNSUPPORTED_EXT 0x010Bu
#define E_SESSION_EXPIRED 0x0201u
#define E_IDLE 0x0203u
#define E_REKEY_TIMEOUT 0x0204u
#define E_TICKET_INVALID 0x0400u
#define E_PROTOCOL 0x0601u
#define E_INTERNAL 0xFF00u

#define SEQ_REKEY_THRESHOLD ((((uint64_t)1) << 40) - (((uint64_t)1) << 30))
#define SEQ_HARD_LIMIT (((uint64_t)1) << 40)
#define MAX_EPOCH 0xFFFFFFFEu
#define NO_TIME UINT64_MAX
#define HANDSHAKE_WIRE_BYTES 16500u     /* §8.5: a handshake's airtime budget */
#define SH_REPLY_BYTES 4600u            /* the CF the SH flight waits for */
#define MAX_RESENDS 7u

#define RX_STEADY 0u
#define RX_TRANSITION 1u
#define TX_STEADY 0u
#define TX_TRANSITION 1u

/* The ServerHello's fixed-size fields, as length prefixes (big-endian). */
static const uint8_t L_KS[2] = {(uint8_t)(PAL_MLKEM768_PK_BYTES >> 8),
                                (uint8_t)(PAL_MLKEM768_PK_BYTES & 0xFFu)};
static const uint8_t L_CT[2] = {(uint8_t)(PAL_MLKEM768_CT_BYTES >> 8),
                                (uint8_t)(PAL_MLKEM768_CT_BYTES & 0xFFu)};
static const uint8_t L_CERT[2] = {(uint8_t)(PAL_MLDSA65_PK_BYTES >> 8),
                                  (uint8_t)(PAL_MLDSA65_PK_BYTES & 0xFFu)};
static const uint8_t L_SIG[2] = {(uint8_t)(PAL_MLDSA65_SIG_BYTES >> 8),
                                 (uint8_t)(PAL_MLDSA65_SIG_BYTES & 0xFFu)};
static const uint8_t ZEROS[4] = {0, 0, 0, 0};
#define SH_LEN (39u + 2u + PAL_MLKEM768_PK_BYTES + 2u + PAL_MLKEM768_CT_BYTES + 2u + \
                PAL_MLDSA65_PK_BYTES + 2u + PAL_MLDSA65_SIG_BYTES + 2u + 2u)

static const char SERVER_CONTEXT[] = "PALISADE server";
static const char SESSION_RID_LABEL[] = "PALISADE session rid"; /* §8.4 check bytes */
static const char CLIENT_CONTEXT[] = "PALISADE client";

/* ---- state machine (§15, server half that CORE uses) -------------------------------------- */

enum { EV_CH_STARTED, EV_CH_DONE, EV_FIN_OK, EV_CLOSE, EV_PEER_CLOSE, EV_DRAINED, EV_FATAL,
       EV_IDLE, EV_N };

/* TABLE[state][event] = next state, or -1 when the pair is refused. */
static const int8_t TABLE[PAL_DEV_N_STATES][EV_N] = {
    /*                 CH_STARTED        CH_DONE           FIN_OK               CLOSE */
    /* LISTEN */      {PAL_DEV_WAIT_CH, -1,               -1,                  PAL_DEV_CLOSED,
    /*                 PEER_CLOSE        DRAINED           FATAL                IDLE */
                       -1,               -1,               PAL_DEV_CLOSED,      -1},
    /* WAIT_CH */     {-1, PAL_DEV_WAIT_FIN, -1, PAL_DEV_CLOSED, -1, -1, PAL_DEV_CLOSED, -1},
    /* WAIT_FIN */    {-1, -1, PAL_DEV_ESTABLISHED, PAL_DEV_CLOSED, -1, -1, PAL_DEV_CLOSED, -1},
    /* ESTABLISHED */ {-1, -1, -1, PAL_DEV_CLOSING, PAL_DEV_CLOSING, -1, PAL_DEV_CLOSED,
                       PAL_DEV_CLOSED},
    /* CLOSING */     {-1, -1, -1, -1, PAL_DEV_CLOSED, PAL_DEV_CLOSED, PAL_DEV_CLOSED,
                       PAL_DEV_CLOSED},
    /* CLOSED */      {-1, -1, -1, -1, -1, -1, -1, -1},
};

static int fire(pal_device *d, int ev)
{
    int8_t nxt = TABLE[d->state][ev];
    if (nxt < 0) {
        d->drops[PAL_DROP_ILLEGAL_EVENT]++;
        return 0;
    }
    d->state = (uint8_t)nxt;
    return 1;
}

/* ---- small helpers ------------------------------------------------------------------------ */

static uint16_t ld16(const uint8_t *p) { return (uint16_t)(((uint16_t)p[0] << 8) | p[1]); }
static uint32_t ld32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static uint64_t ld64(const uint8_t *p) { return ((uint64_t)ld32(p) << 32) | ld32(p + 4); }
static void st16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void st32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}
static void st64(uint8_t *p, uint64_t v) { st32(p, (uint32_t)(v >> 32)); st32(p + 4, (uint32_t)v); }

/* Overwrite a secret so that the compiler cannot drop the stores as dead. */
static void wipe(void *p, size_t n)
{
    volatile uint8_t *v = (volatile uint8_t *)p;
    while (n--)
        *v++ = 0;
}

static uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static uint32_t max32(uint32_t a, uint32_t b) { return a > b ? a : b; }
static uint32_t min32(uint32_t a, uint32_t b) { return a < b ? a : b; }

/* Milliseconds to clock nbytes through the UART (10 bit times per byte, 8N1). */
static uint32_t link_ms(const pal_device *d, uint32_t nbytes)
{
    if (!d->cfg.link_bps)
        return 0;
    /* nbytes stays below 2^18 here, so the product fits 32 bits (no 64-bit division). */
    return (nbytes * 10000u + d->cfg.link_bps - 1u) / d->cfg.link_bps;
}

static uint32_t jitter_rand(pal_device *d)
{
    uint32_t x = d->rng_state;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    d->rng_state = x ? x : 0x9E3779B9u;
    return x;
}

static void push_event(pal_device *d, const pal_device_event *ev)
{
    uint8_t at;
    if (d->ev_count >= PAL_DEVICE_EVENT_QUEUE)
        return; /* the application is not polling; the oldest events are kept */
    at = (uint8_t)((d->ev_head + d->ev_count) % PAL_DEVICE_EVENT_QUEUE);
    d->events[at] = *ev;
    d->ev_count++;
}

static void push_simple(pal_device *d, uint8_t type, uint32_t epoch)
{
    pal_device_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = type;
    ev.epoch = epoch;
    ev.pin_index = d->pin_index;
    push_event(d, &ev);
}

/* ---- key schedule (§2) -------------------------------------------------------------------- */

#define LABEL_PREFIX "PALISADE "
#define LABEL_PREFIX_LEN 9u
#define MAX_INFO 64u

/* Labels are string literals; their lengths come from sizeof, so no strlen is needed. */
#define LIT(s) (s), (sizeof(s) - 1u)

static size_t make_label(uint8_t *out, const char *x, size_t n)
{
    memcpy(out, LABEL_PREFIX, LABEL_PREFIX_LEN);
    memcpy(out + LABEL_PREFIX_LEN, x, n);
    return LABEL_PREFIX_LEN + n;
}

int pal_device_hkdf_expand(void *port, const uint8_t prk[32], const uint8_t *info,
                           size_t info_len, uint8_t *out, size_t out_len)
{
    uint8_t buf[32u + MAX_INFO + 1u];
    uint8_t t[32];
    size_t done = 0, tlen = 0, take;
    uint8_t ctr = 1;
    int rc = 0;
    if (info_len > MAX_INFO || out_len > 64u)
        return -1;
    while (done < out_len) {
        memcpy(buf, t, tlen);
        memcpy(buf + tlen, info, info_len);
        buf[tlen + info_len] = ctr++;
        if (pal_crypto_hmac_sha3_256(port, prk, 32, buf, tlen + info_len + 1u, t) != 0) {
            rc = -1;
            break;
        }
        tlen = 32;
        take = out_len - done < 32u ? out_len - done : 32u;
        memcpy(out + done, t, take);
        done += take;
    }
    wipe(buf, sizeof buf);
    wipe(t, sizeof t);
    return rc;
}

static int expand_label(void *port, const uint8_t prk[32], const char *what, size_t what_len,
                        uint8_t *out, size_t out_len)
{
    uint8_t info[MAX_INFO];
    size_t n = make_label(info, what, what_len);
    return pal_device_hkdf_expand(port, prk, info, n, out, out_len);
}

int pal_device_master_secret(void *port, const uint8_t ss_c[32], const uint8_t ss_s[32],
                             const uint8_t client_nonce[32], const uint8_t server_nonce[32],
                             const uint8_t th[32], uint8_t master[32])
{
    uint8_t ikm[LABEL_PREFIX_LEN + 19u + 96u];
    uint8_t info[LABEL_PREFIX_LEN + 9u + 32u];
    uint8_t zeros[32];
    uint8_t prk[32], hs[32];
    size_t n, i;
    int rc = -1;
    /* IKM = label("palisade v1.2 early") || (ss_c XOR ss_s) || client_nonce || server_nonce */
    n = make_label(ikm, LIT("palisade v1.2 early"));
    for (i = 0; i < 32u; i++)
        ikm[n + i] = (uint8_t)(ss_c[i] ^ ss_s[i]);
    memcpy(ikm + n + 32u, client_nonce, 32);
    memcpy(ikm + n + 64u, server_nonce, 32);
    memset(zeros, 0, sizeof zeros);
    /* early = Extract(zeros(32), IKM); handshake = Expand(early, label("handshake") || th) */
    if (pal_crypto_hmac_sha3_256(port, zeros, 32, ikm, n + 96u, prk) == 0) {
        size_t m = make_label(info, LIT("handshake"));
        memcpy(info + m, th, 32);
        if (pal_device_hkdf_expand(port, prk, info, m + 32u, hs, 32) == 0
            && expand_label(port, hs, LIT("master"), master, 32) == 0)
            rc = 0;
    }
    wipe(ikm, sizeof ikm);
    wipe(prk, sizeof prk);
    wipe(hs, sizeof hs);
    return rc;
}

/* Keys of one direction (`dir` "c2s" or "s2c") for one epoch. */
static int derive_tkey(pal_device *d, const uint8_t secret[32], const char *dir, uint32_t epoch,
                       pal_tkey *k)
{
    char what[7];
    memcpy(what, dir, 3);
    memcpy(what + 3, " key", 4);
    if (expand_label(d->cfg.port, secret, what, 7, k->key, 32) != 0)
        return -1;
    memcpy(what + 3, " iv", 3);
    if (expand_label(d->cfg.port, secret, what, 6, k->iv, 12) != 0)
        return -1;
    k->epoch = epoch;
    k->live = 1;
    return 0;
}

static void erase_tkey(pal_tkey *k)
{
    wipe(k->key, sizeof k->key);
    wipe(k->iv, sizeof k->iv);
    k->live = 0;
}

/* ---- replay window (§4) ------------------------------------------------------------------- */

static void replay_clear(pal_replay *w)
{
    memset(w->bits, 0, sizeof w->bits);
    w->top = 0;
    w->empty = 1;
}

static int replay_check(const pal_replay *w, uint64_t seq)
{
    uint64_t idx;
    if (w->empty || seq > w->top)
        return 1;
    if (w->top - seq >= PAL_DEVICE_REPLAY_WINDOW)
        return 0;
    idx = seq & ((uint64_t)PAL_DEVICE_REPLAY_WORDS * 64u - 1u);
    return !((w->bits[idx >> 6] >> (idx & 63u)) & 1u);
}

static void replay_mark(pal_replay *w, uint64_t seq)
{
    uint64_t idx, steps, i, top_word;
    if (w->empty) {
        w->empty = 0;
        w->top = seq;
    } else if (seq > w->top) {
        top_word = w->top >> 6;
        steps = (seq >> 6) - top_word;
        if (steps > PAL_DEVICE_REPLAY_WORDS)
            steps = PAL_DEVICE_REPLAY_WORDS;
        for (i = 1; i <= steps; i++)
            w->bits[(top_word + i) & (PAL_DEVICE_REPLAY_WORDS - 1u)] = 0;
        w->top = seq;
    }
    idx = seq & ((uint64_t)PAL_DEVICE_REPLAY_WORDS * 64u - 1u);
    w->bits[idx >> 6] |= ((uint64_t)1) << (idx & 63u);
}

/* ---- epochs (§5) -------------------------------------------------------------------------- */

static int epochs_install_master(pal_device *d, const uint8_t master[32])
{
    void *port = d->cfg.port;
    if (expand_label(port, master, LIT("s2c hp"), d->hp_tx, 32) != 0
        || expand_label(port, master, LIT("c2s hp"), d->hp_rx, 32) != 0
        || expand_label(port, master, LIT("epoch 0"), d->secret, 32) != 0
        || derive_tkey(d, d->secret, "c2s", 0, &d->rx_cur) != 0
        || derive_tkey(d, d->secret, "s2c", 0, &d->tx_cur) != 0)
        return -1;
    replay_clear(&d->win_cur);
    replay_clear(&d->win_next);
    d->rx_next.live = 0;
    d->tx_pending.live = 0;
    d->rx_state = RX_STEADY;
    d->tx_state = TX_STEADY;
    d->tx_seq = 0;
    d->packets_on_next = d->phase0_on_next = 0;
    d->next_seen = d->secret_ahead = 0;
    d->armed_at = NO_TIME;
    d->transition_ms = d->cfg.max_transition_ms;
    return 0;
}

static void rx_commit(pal_device *d)
{
    erase_tkey(&d->rx_cur);
    d->rx_cur = d->rx_next;
    d->win_cur = d->win_next;
    d->rx_next.live = 0;
    replay_clear(&d->win_next);
    d->packets_on_next = d->phase0_on_next = 0;
    d->armed_at = NO_TIME;
    d->rx_state = RX_STEADY;
}

/* arm_next_epoch: derive epoch N+1 both ways; receiver STEADY -> TRANSITION. The transition
 * clock starts now (§5.1). After an abandoned attempt `secret` already is N+1's: the retry
 * arms the very same keys. */
static int epochs_arm(pal_device *d, uint64_t now)
{
    uint8_t next[32];
    uint32_t e;
    if (d->rx_state != RX_STEADY || d->tx_pending.live || d->tx_cur.epoch != d->rx_cur.epoch
        || d->tx_state != TX_STEADY || d->rx_cur.epoch >= MAX_EPOCH)
        return -1;
    e = d->rx_cur.epoch + 1u;
    if (d->secret_ahead)
        memcpy(next, d->secret, 32);
    else if (expand_label(d->cfg.port, d->secret, LIT("epoch step"), next, 32) != 0)
        goto failed;
    if (derive_tkey(d, next, "c2s", e, &d->rx_next) != 0
        || derive_tkey(d, next, "s2c", e, &d->tx_pending) != 0)
        goto failed;
    memcpy(d->secret, next, 32); /* epoch N's secret has no further use */
    wipe(next, sizeof next);
    d->secret_ahead = 0;
    replay_clear(&d->win_next);
    d->packets_on_next = d->phase0_on_next = 0;
    d->next_seen = 0;
    d->armed_at = now;
    d->rx_state = RX_TRANSITION;
    return 0;
failed:
    wipe(next, sizeof next);
    erase_tkey(&d->rx_next);
    erase_tkey(&d->tx_pending);
    return -1;
}

/* abandon_next_epoch [profile]: nothing authenticated on the armed epoch by the bound and our
 * sender never moved: erase its keys, STEADY on the current epoch. The secret is kept for the
 * retry (§5.1). */
static void epochs_abandon(pal_device *d)
{
    erase_tkey(&d->rx_next);
    erase_tkey(&d->tx_pending);
    replay_clear(&d->win_next);
    d->secret_ahead = 1;
    d->packets_on_next = d->phase0_on_next = 0;
    d->armed_at = NO_TIME;
    d->rx_state = RX_STEADY;
}

/* install_next_epoch: the sender moves to the armed epoch, seq 0. It sets key_phase 1 only
 * while the peer has not been seen sending on that epoch: once it has, key_phase 0 opens there
 * whatever the peer's receiver state (§5.2). The device installs on that evidence, so in
 * practice it never sets key_phase 1. */
static int epochs_install(pal_device *d)
{
    if (d->tx_state != TX_STEADY || !d->tx_pending.live)
        return -1;
    erase_tkey(&d->tx_cur);
    d->tx_cur = d->tx_pending;
    d->tx_pending.live = 0;
    d->tx_seq = 0;
    d->tx_state = (d->next_seen || d->rx_cur.epoch == d->tx_cur.epoch) ? TX_STEADY
                                                                       : TX_TRANSITION;
    return 0;
}

/* When TRANSITION ends by time, or NO_TIME (§5.1): commit at T with a key_phase 0 packet on
 * the new epoch, at 2T with only key_phase 1 ones, abandon at T with none while our sender has
 * not moved. */
static uint64_t epochs_deadline(const pal_device *d)
{
    if (d->rx_state != RX_TRANSITION || d->armed_at == NO_TIME)
        return NO_TIME;
    if (d->next_seen)
        return d->armed_at + (d->phase0_on_next ? 1u : 2u) * (uint64_t)d->transition_ms;
    if (d->tx_pending.live)
        return d->armed_at + d->transition_ms;
    return NO_TIME;
}

/* The time-based rules. Returns 1 when it abandoned the armed epoch. The receive path passes
 * may_abandon 0: the packet it is about to open may be the evidence that saves the epoch. */
static int epochs_poll(pal_device *d, uint64_t now, int may_abandon)
{
    uint64_t t = epochs_deadline(d);
    if (t == NO_TIME || now < t)
        return 0;
    if (d->next_seen) {
        rx_commit(d);
    } else if (may_abandon) {
        epochs_abandon(d);
        return 1;
    }
    return 0;
}

/* ---- sealing (§3) ------------------------------------------------------------------------- */

static int hp_mask(pal_device *d, const uint8_t key[32], uint8_t *pkt)
{
    uint8_t mask[16];
    unsigned i;
    if (pal_crypto_aes256_encrypt_block(d->cfg.port, key, pkt + HEADER_LEN, mask) != 0)
        return -1;
    for (i = 0; i < 15u; i++)
        pkt[PUB_HEADER + i] ^= mask[i];
    return 0;
}

static void make_nonce(const pal_tkey *k, uint32_t epoch, uint64_t seq, uint8_t nonce[12])
{
    unsigned i;
    for (i = 0; i < 4u; i++)
        nonce[i] = (uint8_t)(k->iv[i] ^ (uint8_t)(epoch >> (24u - 8u * i)));
    for (i = 0; i < 8u; i++)
        nonce[4u + i] = (uint8_t)(k->iv[4u + i] ^ (uint8_t)(seq >> (56u - 8u * i)));
}

/* Seal one packet into out (room checked by the caller). Returns its length, 0 on failure. */
static size_t seal(pal_device *d, const uint8_t *pt, size_t len, uint8_t stream, int control,
                   uint64_t now, uint8_t *out)
{
    uint8_t nonce[12];
    size_t total = HEADER_LEN + len + TAG_LEN;
    if (!d->tx_cur.live || d->tx_seq >= SEQ_HARD_LIMIT)
        return 0;
    out[0] = 0x51;
    out[1] = 0x50;
    out[2] = VERSION;
    out[3] = (uint8_t)((control ? FLAG_CONTROL : 0u) | (d->tx_state ? FLAG_KEY_PHASE : 0u));
    st16(out + 4, (uint32_t)(total - PUB_HEADER));
    memcpy(out + 6, d->rid, PAL_DEVICE_RID_LEN);
    st32(out + 30, d->tx_cur.epoch);
    st64(out + 34, d->tx_seq);
    out[42] = stream;
    st16(out + 43, 0); /* the device sends no padding */
    make_nonce(&d->tx_cur, d->tx_cur.epoch, d->tx_seq, nonce);
    if (pal_crypto_chacha20poly1305_seal(d->cfg.port, d->tx_cur.key, nonce, out, HEADER_LEN,
                                         pt, len, out + HEADER_LEN) != 0)
        return 0;
    if (hp_mask(d, d->hp_tx, out) != 0)
        return 0;
    d->tx_seq++;
    d->last_send = now;
    d->epoch_bytes += total;
    d->packets_out++;
    return total;
}

/* ---- teardown ----------------------------------------------------------------------------- */

static void erase_handshake(pal_device *d)
{
    uint8_t dummy[32];
    if (d->h_live) {
        pal_crypto_sha3_256_final(d->cfg.port, &d->h, dummy);
        d->h_live = 0;
    }
    wipe(d->ks_sk, sizeof d->ks_sk);
    wipe(d->ss_c, sizeof d->ss_c);
    d->flight_running = 0;
    d->sh_to_send = 0;
    d->hs_deadline = NO_TIME;
    d->ack_deadline = NO_TIME;
}

static void teardown(pal_device *d)
{
    erase_handshake(d);
    erase_tkey(&d->rx_cur);
    erase_tkey(&d->rx_next);
    erase_tkey(&d->tx_cur);
    erase_tkey(&d->tx_pending);
    wipe(d->secret, sizeof d->secret);
    wipe(d->hp_tx, sizeof d->hp_tx);
    wipe(d->hp_rx, sizeof d->hp_rx);
    d->rekey_next = -1;
    d->rekey_deadline = NO_TIME;
    d->drain_deadline = NO_TIME;
    d->close_resend_at = NO_TIME;
    d->pend_announce = d->pend_rekey_ack = d->pend_close_answer = d->pend_keepalive = 0;
    d->cf_ack_pending = 0;
    d->state = PAL_DEV_CLOSED;
}

static void set_reason(pal_device *d, const char *reason, size_t n)
{
    if (n > PAL_DEVICE_MAX_REASON) {
        /* Cut at a UTF-8 character boundary (§6): never inside a multi-byte sequence. */
        n = PAL_DEVICE_MAX_REASON;
        while (n > 0 && ((uint8_t)reason[n] & 0xC0u) == 0x80u)
            n--;
    }
    memcpy(d->close_reason, reason, n);
    d->close_reason[n] = '\0';
    d->close_reason_len = (uint8_t)n;
}

static void emit_closed(pal_device *d)
{
    pal_device_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = PAL_EV_CLOSED;
    ev.code = d->close_code;
    ev.by_peer = d->close_by_peer;
    ev.reason = d->close_reason;
    ev.epoch = d->rx_cur.epoch;
    push_event(d, &ev);
}

/* A CTRL_CLOSE frame: code u16 | hard u8 | reason_len u8 | reason. */
static size_t close_frame(uint8_t *p, uint16_t code, int hard, const char *reason, size_t rlen)
{
    p[0] = CTRL_CLOSE;
    p[1] = 0;
    st16(p + 2, (uint32_t)(4u + rlen));
    st16(p + 4, code);
    p[6] = (uint8_t)(hard ? 1u : 0u);
    p[7] = (uint8_t)rlen;
    memcpy(p + 8, reason, rlen);
    return 8u + rlen;
}

/* An ErrorResponse record (never fragmented) into d->last. */
static void error_response(pal_device *d, uint16_t code, const char *detail, size_t dl,
                           const uint8_t *rid)
{
    size_t body;
    uint8_t *p = d->last;
    if (dl > sizeof d->last - HS_OVERHEAD - 4u)
        dl = sizeof d->last - HS_OVERHEAD - 4u;
    body = 4u + dl;
    p[0] = 0x51; p[1] = 0x48; p[2] = VERSION; p[3] = MSG_ERROR;
    st16(p + 4, (uint32_t)(9u + body));
    memcpy(p + 6, rid, PAL_DEVICE_RID_LEN);
    p[30] = 0;
    st32(p + 31, 0);
    st32(p + 35, (uint32_t)body);
    st16(p + 39, code);
    st16(p + 41, (uint32_t)dl);
    memcpy(p + 43, detail, dl);
    d->last_len = (uint16_t)(HS_OVERHEAD + body);
}

/* We found a fatal problem: tell the peer (hard close, or ErrorResponse before keys), then
 * erase everything and report CLOSED (§8.3, §10). */
static void fail_n(pal_device *d, uint16_t code, const char *detail, size_t dl, int send,
                   const uint8_t *rid, uint64_t now)
{
    if (d->state == PAL_DEV_CLOSED)
        return;
    set_reason(d, detail, dl);
    d->last_len = 0;
    if (send) {
        if (d->tx_cur.live) {
            uint8_t frame[8u + PAL_DEVICE_MAX_REASON];
            size_t n = close_frame(frame, code, 1, d->close_reason, d->close_reason_len);
            d->last_len = (uint16_t)seal(d, frame, n, 0, 1, now, d->last);
        } else if (rid != NULL) {
            error_response(d, code, detail, dl, rid);
        }
    }
    fire(d, EV_FATAL);
    d->close_code = code;
    d->close_by_peer = 0;
    teardown(d);
    emit_closed(d);
}

#define fail(d, code, detail, send, rid, now) fail_n(d, code, LIT(detail), send, rid, now)

static void finish_close(pal_device *d)
{
    fire(d, EV_DRAINED);
    teardown(d);
    emit_closed(d);
}

/* ---- reassembly (§8.4) -------------------------------------------------------------------- */

enum { R_MALFORMED = -1, R_PARTIAL = 0, R_COMPLETE = 1, R_DUPLICATE = 2, R_TOO_LARGE = 3 };

static int bit_get(const uint8_t *m, uint32_t i) { return (m[i >> 3] >> (i & 7u)) & 1; }

static void reasm_reset(pal_device *d)
{
    d->r_active = 0;
    d->r_done = 0;
    d->r_len = d->r_held = 0;
    d->r_nfrag = 0;
    memset(d->r_map, 0, sizeof d->r_map);
}

static int reasm_add(pal_device *d, uint8_t type, uint8_t seq, uint32_t off, uint32_t mlen,
                     const uint8_t *frag, uint32_t flen)
{
    uint32_t i, fresh = 0;
    int contained = 1;
    if (!d->r_active) {
        if (mlen > PAL_DEVICE_MAX_MESSAGE)
            return R_TOO_LARGE;
        reasm_reset(d);
        d->r_active = 1;
        d->r_type = type;
        d->r_seq = seq;
        d->r_len = mlen;
    } else if (type != d->r_type || seq != d->r_seq || mlen != d->r_len) {
        return R_MALFORMED;
    }
    if (d->r_done)
        return R_DUPLICATE;
    /* Overlaps must repeat the same bytes: the first copy wins. */
    for (i = 0; i < flen; i++) {
        if (bit_get(d->r_map, off + i)) {
            if (d->r_buf[off + i] != frag[i])
                return R_MALFORMED;
        } else {
            contained = 0;
        }
    }
    if (flen && contained)
        return R_DUPLICATE;
    if (d->r_nfrag >= MAX_FRAGMENTS)
        return R_MALFORMED;
    d->r_nfrag++;
    for (i = 0; i < flen; i++) {
        if (!bit_get(d->r_map, off + i)) {
            d->r_buf[off + i] = frag[i];
            d->r_map[(off + i) >> 3] = (uint8_t)(d->r_map[(off + i) >> 3] | (1u << ((off + i) & 7u)));
            fresh++;
        }
    }
    d->r_held += fresh;
    if (d->r_held == d->r_len) {
        d->r_done = 1;
        return R_COMPLETE;
    }
    return R_PARTIAL;
}

/* A HandshakeAck record for the held ranges of the message being reassembled (or the whole
 * message when full) into out; returns its length. */
static size_t ack_record(const pal_device *d, uint8_t type, uint8_t seq, uint32_t full_len,
                         uint8_t *out)
{
    uint8_t *b = out + HS_OVERHEAD;
    uint32_t count = 0, i = 0, start;
    if (full_len) {
        st32(b + 3, 0);
        st32(b + 7, full_len);
        count = 1;
    } else {
        while (i < d->r_len && count < ACK_MAX_RANGES) {
            while (i < d->r_len && !bit_get(d->r_map, i))
                i++;
            if (i >= d->r_len)
                break;
            start = i;
            while (i < d->r_len && bit_get(d->r_map, i))
                i++;
            st32(b + 3u + 8u * count, start);
            st32(b + 7u + 8u * count, i);
            count++;
        }
    }
    b[0] = type;
    b[1] = seq;
    b[2] = (uint8_t)count;
    out[0] = 0x51; out[1] = 0x48; out[2] = VERSION; out[3] = MSG_ACK;
    st16(out + 4, 9u + 3u + 8u * count);
    memcpy(out + 6, d->rid, PAL_DEVICE_RID_LEN);
    out[30] = 0;
    st32(out + 31, 0);
    st32(out + 35, 3u + 8u * count);
    return HS_OVERHEAD + 3u + 8u * count;
}

/* ---- the ServerHello, kept as its parts (§8.1) --------------------------------------------- */

typedef struct { const uint8_t *p; size_t n; } seg;

/* The SH (or SH*, with the signature field empty) as a list of byte runs. */
static unsigned sh_segments(const pal_device *d, seg s[12], int transcript)
{
    unsigned k = 0;
    s[k].p = d->sh_head; s[k++].n = sizeof d->sh_head;
    s[k].p = L_KS; s[k++].n = 2;
    s[k].p = d->ks_pk; s[k++].n = sizeof d->ks_pk;
    s[k].p = L_CT; s[k++].n = 2;
    s[k].p = d->ct_c; s[k++].n = sizeof d->ct_c;
    s[k].p = L_CERT; s[k++].n = 2;
    s[k].p = d->cfg.identity_pk; s[k++].n = PAL_MLDSA65_PK_BYTES;
    if (transcript) {
        s[k].p = ZEROS; s[k++].n = 2;
    } else {
        s[k].p = L_SIG; s[k++].n = 2;
        s[k].p = d->sh_sig; s[k++].n = sizeof d->sh_sig;
    }
    s[k].p = ZEROS; s[k++].n = 4; /* empty padding, no extensions (CORE) */
    return k;
}

static void seg_copy(const seg *s, unsigned ns, size_t off, uint8_t *out, size_t len)
{
    unsigned i;
    for (i = 0; i < ns && len; i++) {
        if (off >= s[i].n) {
            off -= s[i].n;
            continue;
        }
        {
            size_t take = s[i].n - off < len ? s[i].n - off : len;
            memcpy(out, s[i].p + off, take);
            out += take;
            len -= take;
            off = 0;
        }
    }
}

static uint32_t sh_chunk(const pal_device *d) { return d->cfg.mtu - HS_OVERHEAD; }

/* Record i of the SH flight into out; returns its length. */
static size_t sh_record(const pal_device *d, uint32_t i, uint8_t *out)
{
    seg s[12];
    unsigned ns = sh_segments(d, s, 0);
    uint32_t off = i * sh_chunk(d);
    uint32_t n = min32(sh_chunk(d), (uint32_t)SH_LEN - off);
    out[0] = 0x51; out[1] = 0x48; out[2] = VERSION; out[3] = MSG_SH;
    st16(out + 4, 9u + n);
    memcpy(out + 6, d->rid, PAL_DEVICE_RID_LEN);
    out[30] = 0;
    st32(out + 31, off);
    st32(out + 35, (uint32_t)SH_LEN);
    seg_copy(s, ns, off, out + HS_OVERHEAD, n);
    return HS_OVERHEAD + n;
}

/* ---- retransmission (§8.5) ---------------------------------------------------------------- */

static void flight_arm(pal_device *d, uint64_t now)
{
    /* rto * U(0.75, 1.25), kept within [floor, max(maximum, floor)]. */
    uint32_t factor = 750u + jitter_rand(d) % 501u;
    uint32_t delay = min32(d->rto, 1000000u) * factor / 1000u;
    uint32_t ceiling = max32(d->cfg.max_rto_ms, d->rto_floor);
    if (delay < d->rto_floor)
        delay = d->rto_floor;
    if (delay > ceiling)
        delay = ceiling;
    d->flight_deadline = now + delay;
    d->flight_running = 1;
}

static uint64_t sh_unacked_mask(const pal_device *d)
{
    uint64_t all = d->sh_nrec >= 64u ? ~(uint64_t)0 : ((((uint64_t)1) << d->sh_nrec) - 1u);
    return all & ~d->sh_acked;
}

/* ---- ClientHello (§8.1-§8.3) -------------------------------------------------------------- */

typedef struct { const uint8_t *p; size_t n, pos; int bad; } reader;

static uint32_t rd_u16(reader *r)
{
    uint32_t v;
    if (r->bad || r->n - r->pos < 2u) { r->bad = 1; return 0; }
    v = ld16(r->p + r->pos);
    r->pos += 2;
    return v;
}
static const uint8_t *rd_take(reader *r, size_t k)
{
    const uint8_t *q;
    if (r->bad || r->n - r->pos < k) { r->bad = 1; return NULL; }
    q = r->p + r->pos;
    r->pos += k;
    return q;
}
static const uint8_t *rd_opaque(reader *r, size_t *len, int required)
{
    size_t k = rd_u16(r);
    if (!r->bad && required && k == 0)
        r->bad = 1;
    *len = k;
    return rd_take(r, k);
}

/* An id list: 1..32 ids, no duplicates. Returns 1 if `want` is among them. */
static int rd_ids(reader *r, uint32_t want)
{
    uint32_t count = rd_u16(r), i, j, found = 0;
    const uint8_t *ids;
    if (r->bad || count < 1u || count > 32u) { r->bad = 1; return 0; }
    ids = rd_take(r, 2u * count);
    if (ids == NULL)
        return 0;
    for (i = 0; i < count; i++) {
        for (j = 0; j < i; j++)
            if (ld16(ids + 2u * i) == ld16(ids + 2u * j)) { r->bad = 1; return 0; }
        if (ld16(ids + 2u * i) == want)
            found = 1;
    }
    return (int)found;
}

static int pinned(pal_device *d, const uint8_t *cert, size_t len, uint32_t *index)
{
    uint8_t fp[32];
    pal_sha3_ctx h;
    size_t i;
    if (len != PAL_MLDSA65_PK_BYTES)
        return 0;
    pal_crypto_sha3_256_init(d->cfg.port, &h);
    pal_crypto_sha3_256_update(d->cfg.port, &h, cert, len);
    pal_crypto_sha3_256_final(d->cfg.port, &h, fp);
    for (i = 0; i < d->cfg.pinned_count; i++) {
        if (memcmp(fp, d->cfg.pinned[i], 32) == 0) {
            *index = (uint32_t)i;
            return 1;
        }
    }
    return 0;
}

/* The whole ClientHello is in r_buf. Build the SH or fail with the spec code. */
static void on_client_hello(pal_device *d, uint64_t now)
{
    reader r;
    const uint8_t *nonce, *kc, *cert;
    size_t kc_len, cert_len, sig_len, pad_len, ext_data_len;
    int kem, sig, aead;
    uint32_t next_count, i, j, t;
    uint16_t ext_types[32];
    uint8_t signed_hash[32];
    pal_sha3_ctx sign_h;
    seg s[12];
    unsigned ns;
    void *port = d->cfg.port;

    r.p = d->r_buf; r.n = d->r_len; r.pos = 0; r.bad = 0;
    if (r.n == 0 || r.p[0] != VERSION) {
        fail(d, E_INVALID_VERSION, "ClientHello: unsupported version", 1, d->hello_rid, now);
        return;
    }
    r.pos = 1;
    kem = rd_ids(&r, KEM_MLKEM768);
    sig = rd_ids(&r, SIG_MLDSA65);
    aead = rd_ids(&r, AEAD_CHACHA);
    nonce = rd_take(&r, 32);
    kc = rd_opaque(&r, &kc_len, 1);
    cert = rd_opaque(&r, &cert_len, 1);
    (void)rd_opaque(&r, &sig_len, 0);
    (void)rd_opaque(&r, &pad_len, 0);
    next_count = rd_u16(&r);
    if (next_count > 32u)
        r.bad = 1;
    t = 0;
    for (i = 0; !r.bad && i < next_count; i++) {
        uint32_t type = rd_u16(&r);
        (void)rd_opaque(&r, &ext_data_len, 0);
        for (j = 0; j < i; j++)
            if (ext_types[j] == type)
                r.bad = 1;
        ext_types[i] = (uint16_t)type;
        if (type == EXT_PLUS && ext_data_len != 1u)
            r.bad = 1;
        if (type != EXT_PLUS && !(type & EXT_IGNORABLE))
            t = 1; /* unknown and not ignorable: refused after the codec checks */
    }
    if (r.bad || r.pos != r.n || nonce == NULL || kc == NULL || cert == NULL) {
        fail(d, E_INVALID_CH, "ClientHello malformed", 1, d->hello_rid, now);
        return;
    }
    if (sig_len != 0) {
        fail(d, E_INVALID_CH, "ClientHello must not carry a signature", 1, d->hello_rid, now);
        return;
    }
    if (!kem) { fail(d, E_UNSUPPORTED_KEM, "no common KEM", 1, d->hello_rid, now); return; }
    if (!sig) { fail(d, E_UNSUPPORTED_SIG, "no common signature", 1, d->hello_rid, now); return; }
    if (!aead) { fail(d, E_UNSUPPORTED_AEAD, "no common AEAD", 1, d->hello_rid, now); return; }
    if (t) {
        fail(d, E_UNSUPPORTED_EXT, "unsupported extension", 1, d->hello_rid, now);
        return;
    }
    /* PLUS is never granted: the device runs CORE, so the SH carries no extension. */
    if (!pinned(d, cert, cert_len, &d->pin_index)) {
        fail(d, E_CERT_INVALID, "client key is not pinned", 1, d->hello_rid, now);
        return;
    }
    if (kc_len != PAL_MLKEM768_PK_BYTES
        || pal_crypto_mlkem768_encaps(port, kc, d->ct_c, d->ss_c) != 0) {
        fail(d, E_INVALID_CH, "peer KEM public key is invalid", 1, d->hello_rid, now);
        return;
    }
    memcpy(d->client_nonce, nonce, 32);
    memcpy(d->client_pk, cert, PAL_MLDSA65_PK_BYTES);
    d->sh_head[0] = VERSION;
    st16(d->sh_head + 1, KEM_MLKEM768);
    st16(d->sh_head + 3, SIG_MLDSA65);
    st16(d->sh_head + 5, AEAD_CHACHA);
    if (pal_crypto_random(port, d->sh_head + 7, 32) != 0
        || pal_crypto_mlkem768_keygen(port, d->ks_pk, d->ks_sk) != 0) {
        fail(d, E_INTERNAL, "internal error", 1, d->hello_rid, now);
        return;
    }
    /* Transcript: CH* is CH as received (no signature), then SH*; sign its hash. */
    pal_crypto_sha3_256_init(port, &d->h);
    d->h_live = 1;
    pal_crypto_sha3_256_update(port, &d->h, d->r_buf, d->r_len);
    ns = sh_segments(d, s, 1);
    for (i = 0; i < ns; i++)
        pal_crypto_sha3_256_update(port, &d->h, s[i].p, s[i].n);
    pal_crypto_sha3_256_clone(port, &sign_h, &d->h);
    pal_crypto_sha3_256_final(port, &sign_h, signed_hash);
    if (pal_crypto_mldsa65_sign(port, d->cfg.identity_sk, d->cfg.identity_sk_len, signed_hash,
                                32, (const uint8_t *)SERVER_CONTEXT,
                                sizeof SERVER_CONTEXT - 1u, d->sh_sig) != 0) {
        fail(d, E_INTERNAL, "internal error", 1, d->hello_rid, now);
        return;
    }
    /* Session RID: node id (or the client's prefix without one), rotation epoch 0, 7 random
     * bytes, then 7 check bytes, SHA3-256(label || hello RID || the first 17 bytes), which let
     * the client tie this reply to its own hello (docs/protocol.md §8.4). */
    memcpy(d->rid, d->cfg.has_node_id ? d->cfg.node_id : d->hello_rid, 8);
    d->rid[8] = 0;
    d->rid[9] = 0;
    if (pal_crypto_random(port, d->rid + 10, 7) != 0) {
        fail(d, E_INTERNAL, "internal error", 1, d->hello_rid, now);
        return;
    }
    {
        pal_sha3_ctx tag_h;
        uint8_t tag[PAL_SHA3_256_BYTES];
        pal_crypto_sha3_256_init(port, &tag_h);
        pal_crypto_sha3_256_update(port, &tag_h, (const uint8_t *)SESSION_RID_LABEL,
                                   sizeof SESSION_RID_LABEL - 1u);
        pal_crypto_sha3_256_update(port, &tag_h, d->hello_rid, PAL_DEVICE_RID_LEN);
        pal_crypto_sha3_256_update(port, &tag_h, d->rid, PAL_DEVICE_RID_LEN - 7u);
        pal_crypto_sha3_256_final(port, &tag_h, tag);
        memcpy(d->rid + PAL_DEVICE_RID_LEN - 7u, tag, 7);
    }
    d->rid_set = 1;
    d->ch_len = d->r_len;
    fire(d, EV_CH_DONE);
    /* The flight: every record goes out now; the timer covers SH and the CF it waits for. */
    d->sh_nrec = (uint32_t)((SH_LEN + sh_chunk(d) - 1u) / sh_chunk(d));
    d->sh_to_send = sh_unacked_mask(d);
    d->sh_acked = 0;
    d->rto_floor = 2u * link_ms(d, (uint32_t)(SH_LEN + d->sh_nrec * HS_OVERHEAD) + SH_REPLY_BYTES);
    d->rto = max32(d->cfg.initial_rto_ms, d->rto_floor);
    d->attempts = 0;
    d->flight_sent_at = d->flight_started_at = now;
    flight_arm(d, now);
    reasm_reset(d); /* the buffer now waits for CF */
}

/* ---- ClientFinished --------------------------------------------------------------------- */

static void on_client_finished(pal_device *d, uint64_t now)
{
    reader r;
    const uint8_t *ct, *csig, *pad;
    size_t ct_len, sig_len, pad_len;
    uint8_t th[32], ss_s[32], master[32], lens[2];
    void *port = d->cfg.port;
    pal_device_event ev;

    r.p = d->r_buf; r.n = d->r_len; r.pos = 0; r.bad = 0;
    ct = rd_opaque(&r, &ct_len, 1);
    csig = rd_opaque(&r, &sig_len, 0);
    pad = rd_opaque(&r, &pad_len, 0);
    if (r.bad || r.pos != r.n || ct == NULL || csig == NULL || pad == NULL) {
        fail(d, E_INVALID_CF, "ClientFinished malformed", 1, d->rid, now);
        return;
    }
    /* th = SHA3-256(CH* || SH* || CF*), CF* = CF with an empty signature field. */
    st16(lens, (uint32_t)ct_len);
    pal_crypto_sha3_256_update(port, &d->h, lens, 2);
    pal_crypto_sha3_256_update(port, &d->h, ct, ct_len);
    pal_crypto_sha3_256_update(port, &d->h, ZEROS, 2);
    st16(lens, (uint32_t)pad_len);
    pal_crypto_sha3_256_update(port, &d->h, lens, 2);
    pal_crypto_sha3_256_update(port, &d->h, pad, pad_len);
    pal_crypto_sha3_256_final(port, &d->h, th);
    d->h_live = 0;
    if (pal_crypto_mldsa65_verify(port, d->client_pk, th, 32, (const uint8_t *)CLIENT_CONTEXT,
                                  sizeof CLIENT_CONTEXT - 1u, csig, sig_len) != 0) {
        fail(d, E_SIG_VERIFY, "client signature", 1, d->rid, now);
        return;
    }
    if (ct_len != PAL_MLKEM768_CT_BYTES
        || pal_crypto_mlkem768_decaps(port, d->ks_sk, ct, ss_s) != 0) {
        fail(d, E_KEM_DECAP, "KEM decapsulation failed", 1, d->rid, now);
        return;
    }
    if (pal_device_master_secret(port, d->ss_c, ss_s, d->client_nonce, d->sh_head + 7, th,
                                 master) != 0
        || epochs_install_master(d, master) != 0) {
        wipe(ss_s, sizeof ss_s);
        wipe(master, sizeof master);
        fail(d, E_INTERNAL, "internal error", 1, d->rid, now);
        return;
    }
    wipe(ss_s, sizeof ss_s);
    wipe(master, sizeof master);
    d->cf_len = d->r_len;
    d->cf_seq = d->r_seq;
    d->cf_ack_pending = 1;
    erase_handshake(d);
    fire(d, EV_FIN_OK);
    /* A rekey attempt must outlast a few round trips of this path (§5.1); the SH flight
     * and the CF that answered it gave one sample. */
    d->transition_ms = max32(d->cfg.max_transition_ms,
                             3u * min32((uint32_t)min64(now - d->flight_started_at, 0xFFFFFFFFu),
                                        d->cfg.max_rto_ms));
    d->last_recv = d->last_send = d->epoch_started = now;
    d->epoch_bytes = 0;
    d->reported_epoch = 0;
    d->rekey_next = -1;
    memset(&ev, 0, sizeof ev);
    ev.type = PAL_EV_HANDSHAKE_DONE;
    ev.pin_index = d->pin_index;
    push_event(d, &ev);
}

/* ---- handshake records ------------------------------------------------------------------ */

static void on_ack(pal_device *d, const uint8_t *b, uint32_t n)
{
    uint32_t count, i, k, prev_end = 0;
    uint64_t acked = 0;
    if (n < 3u || b[0] < MSG_CH || b[0] > MSG_CFR) {
        d->drops[PAL_DROP_HS_MALFORMED]++;
        return;
    }
    count = b[2];
    if (count > ACK_MAX_RANGES || n != 3u + 8u * count) {
        d->drops[PAL_DROP_HS_MALFORMED]++;
        return;
    }
    for (k = 0; k < count; k++) {
        uint32_t s = ld32(b + 3u + 8u * k), e = ld32(b + 7u + 8u * k);
        if (s >= e || e > MAX_HS_MESSAGE || (k && s <= prev_end)) {
            d->drops[PAL_DROP_HS_MALFORMED]++;
            return;
        }
        prev_end = e;
    }
    if (b[0] != MSG_SH || b[1] != 0 || d->state != PAL_DEV_WAIT_FIN) {
        d->drops[PAL_DROP_STALE_ACK]++;
        return;
    }
    /* The latest ack replaces earlier ones (§8.5). */
    for (i = 0; i < d->sh_nrec; i++) {
        uint32_t s = i * sh_chunk(d), e = min32(s + sh_chunk(d), (uint32_t)SH_LEN);
        for (k = 0; k < count; k++)
            if (ld32(b + 3u + 8u * k) <= s && e <= ld32(b + 7u + 8u * k))
                acked |= ((uint64_t)1) << i;
    }
    d->sh_acked = acked;
    d->sh_to_send &= ~acked;
    if (sh_unacked_mask(d) == 0)
        d->flight_running = 0;
}

static void on_handshake_record(pal_device *d, const uint8_t *p, size_t n, uint64_t now)
{
    uint8_t type, seq;
    uint32_t off, mlen, flen;
    const uint8_t *rid = p + 6;
    int st;
    if (n < HS_OVERHEAD || p[2] != VERSION || ld16(p + 4) != n - HS_HEADER) {
        d->drops[PAL_DROP_HS_MALFORMED]++;
        return;
    }
    type = p[3];
    seq = p[30];
    off = ld32(p + 31);
    mlen = ld32(p + 35);
    flen = (uint32_t)(n - HS_OVERHEAD);
    /* The field rules of hsrecord (§8.4). */
    if (!((type >= MSG_CH && type <= MSG_CFR) || type == MSG_RETRY || type == MSG_ACK
          || type == MSG_ERROR)
        || mlen > MAX_HS_MESSAGE || (uint64_t)off + flen > mlen || (flen == 0 && mlen != 0)) {
        d->drops[PAL_DROP_HS_MALFORMED]++;
        return;
    }
    if (type > MSG_CFR && (off != 0 || flen != mlen || ((type == MSG_ACK || type == MSG_RETRY)
                                                       && seq != 0))) {
        d->drops[PAL_DROP_HS_MALFORMED]++;
        return;
    }
    if (!d->amp_validated)
        d->amp_in += n;
    if (d->state == PAL_DEV_CLOSED) {
        d->drops[PAL_DROP_CLOSED]++;
        return;
    }
    switch (type) {
    case MSG_CH:
        if (d->state == PAL_DEV_LISTEN) {
            /* One context, one handshake: a first fragment it cannot take leaves the device
             * listening, so a single hostile datagram cannot hold it for a whole timeout. */
            reasm_reset(d);
            st = reasm_add(d, type, seq, off, mlen, p + HS_OVERHEAD, flen);
            if (st == R_TOO_LARGE || st == R_MALFORMED) {
                reasm_reset(d);
                d->drops[st == R_TOO_LARGE ? PAL_DROP_HS_TOO_LARGE : PAL_DROP_HS_MALFORMED]++;
                return;
            }
            memcpy(d->hello_rid, rid, PAL_DEVICE_RID_LEN);
            d->hs_deadline = now + d->cfg.handshake_timeout_ms
                             + 2u * (uint64_t)link_ms(d, HANDSHAKE_WIRE_BYTES);
            fire(d, EV_CH_STARTED);
            break;
        } else if (memcmp(rid, d->hello_rid, PAL_DEVICE_RID_LEN) != 0) {
            d->drops[PAL_DROP_UNKNOWN_RID]++;
            return;
        }
        if (d->state != PAL_DEV_WAIT_CH) {
            /* The hello again: our SH (or part of it) was lost. Resend what is missing, at
             * most once per retransmission timeout. */
            if (d->state == PAL_DEV_WAIT_FIN && mlen == d->ch_len) {
                if (now - d->flight_sent_at < d->rto) {
                    d->drops[PAL_DROP_RESEND_SUPPRESSED]++;
                } else {
                    d->flight_sent_at = now;
                    d->sh_to_send |= sh_unacked_mask(d);
                }
            } else {
                d->drops[PAL_DROP_UNEXPECTED_HS]++;
            }
            return;
        }
        st = reasm_add(d, type, seq, off, mlen, p + HS_OVERHEAD, flen);
        break;
    case MSG_CF:
        if (!d->rid_set || memcmp(rid, d->rid, PAL_DEVICE_RID_LEN) != 0) {
            d->drops[PAL_DROP_UNKNOWN_RID]++;
            return;
        }
        d->amp_validated = 1; /* only a client that received SH knows the session RID */
        if (d->state == PAL_DEV_ESTABLISHED || d->state == PAL_DEV_CLOSING) {
            /* CF again: our ack was lost; acknowledge the whole message once more. */
            if (mlen == d->cf_len && seq == d->cf_seq)
                d->cf_ack_pending = 1;
            else
                d->drops[PAL_DROP_UNEXPECTED_HS]++;
            return;
        }
        if (d->state != PAL_DEV_WAIT_FIN) {
            d->drops[PAL_DROP_UNEXPECTED_HS]++;
            return;
        }
        d->flight_running = 0; /* a CF fragment proves SH arrived */
        d->sh_to_send = 0;
        st = reasm_add(d, type, seq, off, mlen, p + HS_OVERHEAD, flen);
        break;
    case MSG_ACK:
        if (!d->rid_set || memcmp(rid, d->rid, PAL_DEVICE_RID_LEN) != 0) {
            d->drops[PAL_DROP_UNKNOWN_RID]++;
            return;
        }
        d->amp_validated = 1;
        on_ack(d, p + HS_OVERHEAD, flen);
        return;
    case MSG_ERROR:
        if (!d->rid_set || memcmp(rid, d->rid, PAL_DEVICE_RID_LEN) != 0
            || d->state != PAL_DEV_WAIT_FIN || flen < 4u) {
            d->drops[PAL_DROP_UNEXPECTED_HS]++;
            return;
        }
        {
            uint32_t dl = ld16(p + HS_OVERHEAD + 2);
            if (dl > 1024u || 4u + dl != flen) {
                d->drops[PAL_DROP_HS_MALFORMED]++;
                return;
            }
            fire(d, EV_FATAL);
            d->close_code = ld16(p + HS_OVERHEAD);
            d->close_by_peer = 1;
            set_reason(d, (const char *)(p + HS_OVERHEAD + 4), dl);
            teardown(d);
            emit_closed(d);
        }
        return;
    case MSG_CHR:
        /* Resumption is PLUS; a CORE device refuses the ticket so the client falls back to a
         * full handshake at once (§12), statelessly, with no session created. */
        if (d->state == PAL_DEV_LISTEN) {
            d->drops[PAL_DROP_RESUME_REFUSED]++;
            error_response(d, E_TICKET_INVALID, LIT("resumption disabled"), rid);
        } else {
            d->drops[PAL_DROP_UNEXPECTED_HS]++;
        }
        return;
    default:
        d->drops[PAL_DROP_UNEXPECTED_HS]++;
        return;
    }
    if (st == R_TOO_LARGE) {
        d->drops[PAL_DROP_HS_TOO_LARGE]++;
        return;
    }
    if (st == R_MALFORMED) {
        d->drops[PAL_DROP_HS_MALFORMED]++;
        return;
    }
    if (st == R_PARTIAL || st == R_DUPLICATE) {
        /* Delayed ack: a burst of fragments earns one, sent if still incomplete. */
        if (d->ack_deadline == NO_TIME)
            d->ack_deadline = now + d->cfg.initial_rto_ms / 4u + link_ms(d, 2u * d->cfg.mtu);
        return;
    }
    d->ack_deadline = NO_TIME;
    if (type == MSG_CH)
        on_client_hello(d, now);
    else
        on_client_finished(d, now);
}

/* ---- control frames (§6, §9, §10) ------------------------------------------------------- */

/* The retransmission interval restarts at rekey_retransmit, and never exceeds T / 4, so at
 * least four announcements (or acks) go out in one attempt (§9). */
static void rekey_timer_arm(pal_device *d, uint64_t now)
{
    d->rekey_interval = min32(d->cfg.rekey_retransmit_ms, d->transition_ms / 4u);
    d->rekey_deadline = now + d->rekey_interval;
}

/* Longest a rekey may run: every attempt at its longest (2T) plus the longest back-off (§9). */
static uint64_t rekey_budget(const pal_device *d)
{
    return (uint64_t)PAL_DEVICE_REKEY_ATTEMPTS
           * (2u * (uint64_t)d->transition_ms + max32(d->cfg.max_rto_ms,
                                                       d->cfg.rekey_retransmit_ms));
}

static void start_rekey(pal_device *d, uint64_t now)
{
    if (d->rekey_next >= 0 || d->rx_state != RX_STEADY || d->tx_pending.live)
        return;
    if (d->tx_state == TX_TRANSITION)
        d->tx_state = TX_STEADY; /* both halves are on the current epoch already */
    if (epochs_arm(d, now) != 0)
        return;
    d->rekey_next = (int64_t)d->rx_next.epoch;
    d->rekey_started = now;
    d->rekey_attempt = 1;
    d->pend_announce = 1;
    rekey_timer_arm(d, now);
}

/* The rekey timer (§9): after an abandoned attempt's back-off, arm the same epoch again and
 * announce it afresh; before the client's evidence, repeat the announcement; after it, repeat
 * our kind 2 frame on the new epoch until a key_phase 0 packet of the client's arrives. */
static void rekey_retransmit(pal_device *d, uint64_t now)
{
    if (d->rx_state == RX_STEADY && d->rx_cur.epoch + 1u == (uint32_t)d->rekey_next) {
        if (epochs_arm(d, now) != 0) {
            d->rekey_deadline = NO_TIME; /* cannot happen: the budget still ends the rekey */
            return;
        }
        d->rekey_attempt++;
        d->pend_announce = 1;
        rekey_timer_arm(d, now);
        return;
    }
    if (!d->tx_pending.live) {
        if (d->phase0_on_next || d->rx_state == RX_STEADY) {
            d->rekey_deadline = NO_TIME;
            return;
        }
        d->pend_rekey_ack = 1;
        d->pend_rekey_ack_epoch = (uint32_t)d->rekey_next;
    } else {
        d->pend_announce = 1;
    }
    d->rekey_interval = min32(min32(d->rekey_interval * 2u, d->cfg.max_rto_ms),
                              d->transition_ms / 4u);
    d->rekey_deadline = now + d->rekey_interval;
}

/* An attempt ended with no sign that the client moved: retry after a back-off, or give up
 * after PAL_DEVICE_REKEY_ATTEMPTS attempts (§9). */
static void rekey_abandoned(pal_device *d, uint64_t now)
{
    uint32_t backoff;
    if (d->rekey_next < 0 || d->state != PAL_DEV_ESTABLISHED) {
        d->rekey_deadline = NO_TIME;
        return;
    }
    if (d->rekey_attempt >= PAL_DEVICE_REKEY_ATTEMPTS) {
        fail(d, E_REKEY_TIMEOUT, "peer never moved to the next epoch", 1, NULL, now);
        return;
    }
    backoff = d->cfg.rekey_retransmit_ms << (d->rekey_attempt - 1u);
    d->rekey_deadline = now + min32(backoff, d->cfg.max_rto_ms);
}

/* The client is on the new epoch: install our sender and say so, on the new epoch (§9). */
static void rekey_evidence(pal_device *d, uint64_t now)
{
    if (d->tx_pending.live && epochs_install(d) == 0) {
        d->pend_rekey_ack = 1;
        d->pend_rekey_ack_epoch = d->tx_cur.epoch;
        d->pend_announce = 0; /* an announcement still queued would now go out on N+1 */
        rekey_timer_arm(d, now);
    }
    if (d->phase0_on_next || d->rx_state == RX_STEADY)
        d->rekey_deadline = NO_TIME;
}

static void after_epoch_activity(pal_device *d, uint64_t now)
{
    uint32_t e = d->rx_cur.epoch;
    if (!d->rx_cur.live)
        return;
    if (e != d->reported_epoch && d->tx_cur.epoch == e) {
        d->reported_epoch = e;
        d->rekey_next = -1;
        d->rekey_attempt = 0;
        d->rekey_deadline = NO_TIME;
        d->epoch_started = now;
        d->epoch_bytes = 0;
        push_simple(d, PAL_EV_EPOCH, e);
    }
}

static void on_close_frame(pal_device *d, const uint8_t *f, uint32_t n, uint64_t now)
{
    uint16_t code;
    uint32_t rlen;
    if (n < 4u || f[2] > 1u || f[3] > PAL_DEVICE_MAX_REASON || n != 4u + f[3]) {
        d->drops[PAL_DROP_MALFORMED_CONTROL]++;
        return;
    }
    code = ld16(f);
    rlen = f[3];
    if (f[2]) { /* hard close: the peer aborted */
        fire(d, EV_FATAL);
        d->close_code = code;
        d->close_by_peer = 1;
        set_reason(d, (const char *)(f + 4), rlen);
        teardown(d);
        emit_closed(d);
        return;
    }
    if (d->state == PAL_DEV_CLOSING) {
        if (d->close_by_peer) {
            d->pend_close_answer = 1; /* the peer resent its close: answer again */
            return;
        }
        fire(d, EV_PEER_CLOSE); /* the answer to our close */
        teardown(d);
        emit_closed(d);
        return;
    }
    if (!fire(d, EV_PEER_CLOSE))
        return;
    d->close_code = code;
    d->close_by_peer = 1;
    set_reason(d, (const char *)(f + 4), rlen);
    d->pend_close_answer = 1;
    d->rekey_deadline = NO_TIME; /* a closing session finishes no rekey */
    d->drain_deadline = now + d->cfg.close_drain_ms;
}

static void on_rekey_frame(pal_device *d, const uint8_t *f, uint32_t n, uint64_t now)
{
    uint32_t next;
    if (n != 5u || f[4] > REKEY_ACK) {
        d->drops[PAL_DROP_MALFORMED_CONTROL]++;
        return;
    }
    next = ld32(f);
    if (f[4] == REKEY_REQUEST) {
        if (next == d->rx_cur.epoch + 1u && d->rekey_next < 0)
            start_rekey(d, now);
        else if (d->rekey_next < 0)
            d->drops[PAL_DROP_UNEXPECTED_REKEY]++;
    } else if (f[4] == REKEY_ACK) {
        if (d->rekey_next == (int64_t)next)
            rekey_evidence(d, now);
        else
            d->drops[PAL_DROP_UNEXPECTED_REKEY]++;
    } else {
        d->drops[PAL_DROP_UNEXPECTED_REKEY]++;
    }
}

static void on_control(pal_device *d, const uint8_t *p, size_t n, uint64_t now)
{
    size_t off = 0;
    unsigned count = 0;
    /* Validate the framing of the whole packet first: bad framing voids every frame. */
    while (off < n) {
        uint32_t len;
        if (count >= MAX_FRAMES || n - off < 4u) {
            d->drops[PAL_DROP_MALFORMED_CONTROL]++;
            return;
        }
        len = ((uint32_t)p[off + 1] << 16) | ((uint32_t)p[off + 2] << 8) | p[off + 3];
        if (len > n - off - 4u) {
            d->drops[PAL_DROP_MALFORMED_CONTROL]++;
            return;
        }
        off += 4u + len;
        count++;
    }
    if (n == 0) {
        d->drops[PAL_DROP_MALFORMED_CONTROL]++;
        return;
    }
    off = 0;
    while (off < n && d->state != PAL_DEV_CLOSED) {
        uint32_t len = ((uint32_t)p[off + 1] << 16) | ((uint32_t)p[off + 2] << 8) | p[off + 3];
        const uint8_t *f = p + off + 4u;
        if (p[off] == CTRL_REKEY)
            on_rekey_frame(d, f, len, now);
        else if (p[off] == CTRL_CLOSE)
            on_close_frame(d, f, len, now);
        else
            d->drops[PAL_DROP_IGNORED_CONTROL]++; /* unknown, or PLUS not negotiated */
        off += 4u + len;
    }
}

/* ---- opening packets (§3.7) ------------------------------------------------------------- */

static void on_packet(pal_device *d, uint8_t *p, size_t n, uint64_t now)
{
    uint8_t aad[HEADER_LEN], mask[16], nonce[12];
    uint32_t epoch_id, pad_len, pt_len, i;
    uint64_t seq;
    uint8_t flags, stream, phase;
    int attempt, tried = 0;
    pal_tkey *key = NULL;
    pal_replay *win = NULL;

    if (d->state == PAL_DEV_CLOSED) {
        d->drops[PAL_DROP_CLOSED]++;
        return;
    }
    if (!d->rx_cur.live) {
        d->drops[PAL_DROP_NO_KEYS]++; /* data that overtook CF: lost, like any loss */
        return;
    }
    if (n < MIN_PACKET) { d->drops[PAL_DROP_TRUNCATED]++; return; }
    if (p[2] != VERSION) { d->drops[PAL_DROP_BAD_VERSION]++; return; }
    flags = p[3];
    if (flags & FLAGS_RESERVED) { d->drops[PAL_DROP_RESERVED_BITS]++; return; }
    if (ld16(p + 4) != n - PUB_HEADER) { d->drops[PAL_DROP_BAD_LENGTH]++; return; }
    if (memcmp(p + 6, d->rid, PAL_DEVICE_RID_LEN) != 0) {
        d->drops[PAL_DROP_UNKNOWN_RID]++;
        return;
    }
    if (pal_crypto_aes256_encrypt_block(d->cfg.port, d->hp_rx, p + HEADER_LEN, mask) != 0) {
        d->drops[PAL_DROP_AEAD]++;
        return;
    }
    memcpy(aad, p, PUB_HEADER);
    for (i = 0; i < 15u; i++)
        aad[PUB_HEADER + i] = (uint8_t)(p[PUB_HEADER + i] ^ mask[i]);
    epoch_id = ld32(aad + 30);
    seq = ld64(aad + 34);
    stream = aad[42];
    pad_len = ld16(aad + 43);
    pt_len = (uint32_t)(n - HEADER_LEN - TAG_LEN);
    if (pad_len > pt_len) { d->drops[PAL_DROP_BAD_PADDING]++; return; }
    epochs_poll(d, now, 0);
    phase = (uint8_t)((flags >> 2) & 1u);
    for (attempt = 0; attempt < 2; attempt++) {
        /* The indicated key_phase first, the other second; a key whose epoch is not the
         * header's cannot open the packet and costs no attempt (§5.1). At most one key can
         * match, so decrypting in place never spoils a second attempt. */
        int ph = attempt == 0 ? phase : 1 - phase;
        pal_tkey *k;
        pal_replay *w;
        if (d->rx_state == RX_STEADY) {
            if (attempt != 0 || phase != 0)
                continue;
            k = &d->rx_cur;
            w = &d->win_cur;
        } else if (ph == 0) {
            k = &d->rx_cur;
            w = &d->win_cur;
        } else {
            k = &d->rx_next;
            w = &d->win_next;
        }
        if (!k->live || k->epoch != epoch_id)
            continue;
        if (!replay_check(w, seq)) {
            d->drops[PAL_DROP_REPLAY]++;
            return;
        }
        tried = 1;
        make_nonce(k, epoch_id, seq, nonce);
        if (pal_crypto_chacha20poly1305_open(d->cfg.port, k->key, nonce, aad, HEADER_LEN,
                                             p + HEADER_LEN, n - HEADER_LEN,
                                             p + HEADER_LEN) != 0)
            break;
        key = k;
        win = w;
        break;
    }
    if (key == NULL) {
        if (tried)
            d->drops[PAL_DROP_AEAD]++;
        else if (d->rx_state == RX_STEADY && phase == 1)
            d->drops[PAL_DROP_KEY_PHASE]++;
        else
            d->drops[PAL_DROP_EPOCH]++;
        return;
    }
    for (i = pt_len - pad_len; i < pt_len; i++) {
        if (p[HEADER_LEN + i]) {
            d->drops[PAL_DROP_BAD_PADDING]++;
            return;
        }
    }
    pt_len -= pad_len;
    /* Authenticated: now, and only now, state changes. */
    replay_mark(win, seq);
    if (key == &d->rx_next) {
        d->packets_on_next++;
        d->next_seen = 1;
        /* Only key_phase 0 counts: the peer's sender has finished its transition (§5.1). */
        if (phase == 0 && ++d->phase0_on_next >= d->cfg.commit_threshold)
            rx_commit(d);
    }
    if (d->tx_state == TX_TRANSITION && epoch_id == d->tx_cur.epoch)
        d->tx_state = TX_STEADY; /* the peer sends on our epoch: the hint is over (§5.2) */
    d->packets_in++;
    d->last_recv = now;
    d->epoch_bytes += n;
    if (d->rekey_next >= 0 && epoch_id == (uint32_t)d->rekey_next)
        rekey_evidence(d, now);
    if (flags & FLAG_CONTROL) {
        on_control(d, p + HEADER_LEN, pt_len, now);
    } else if (stream != STREAM_KEEPALIVE && stream != STREAM_DUMMY) {
        pal_device_event ev;
        memset(&ev, 0, sizeof ev);
        ev.type = PAL_EV_DATA;
        ev.stream = stream;
        ev.data = p + HEADER_LEN;
        ev.len = pt_len;
        ev.epoch = epoch_id;
        push_event(d, &ev);
    }
    if (d->state != PAL_DEV_CLOSED)
        after_epoch_activity(d, now);
}

/* ---- public API ------------------------------------------------------------------------- */

int pal_device_init(pal_device *d, const pal_device_config *cfg, uint64_t now)
{
    uint8_t seed[4];
    memset(d, 0, sizeof *d);
    if (cfg == NULL || cfg->identity_pk == NULL || cfg->identity_sk == NULL
        || cfg->mtu < PAL_DEVICE_MIN_MTU || cfg->mtu > 65535u
        /* the SH flight is tracked in a 64-bit mask */
        || (SH_LEN + (cfg->mtu - HS_OVERHEAD) - 1u) / (cfg->mtu - HS_OVERHEAD) > 64u
        || (cfg->pinned_count && cfg->pinned == NULL))
        return -1;
    d->cfg = *cfg;
#define DEF(f, v) if (!d->cfg.f) d->cfg.f = (v)
    DEF(initial_rto_ms, 300u);
    DEF(max_rto_ms, 8000u);
    DEF(handshake_timeout_ms, 15000u);
    DEF(idle_timeout_ms, 60000u);
    DEF(keepalive_ms, 15000u);
    DEF(close_drain_ms, 1000u);
    DEF(rekey_after_ms, 120000u);
    DEF(rekey_retransmit_ms, 500u);
    DEF(max_transition_ms, 2000u);
    DEF(commit_threshold, 16u);
    DEF(rekey_after_bytes, ((uint64_t)1) << 34);
#undef DEF
    if (d->cfg.max_rto_ms < d->cfg.initial_rto_ms)
        d->cfg.max_rto_ms = d->cfg.initial_rto_ms;
    if (pal_crypto_random(d->cfg.port, seed, sizeof seed) != 0)
        return -1;
    d->rng_state = ld32(seed) | 1u;
    d->state = PAL_DEV_LISTEN;
    d->rekey_next = -1;
    d->hs_deadline = d->ack_deadline = d->flight_deadline = NO_TIME;
    d->rekey_deadline = d->drain_deadline = d->close_resend_at = NO_TIME;
    d->armed_at = NO_TIME;
    d->last_recv = d->last_send = d->epoch_started = now;
    replay_clear(&d->win_cur);
    replay_clear(&d->win_next);
    return 0;
}

void pal_device_input(pal_device *d, uint8_t *buf, size_t len, uint64_t now)
{
    if (buf == NULL || len < 2u) {
        d->drops[PAL_DROP_TRUNCATED]++;
        return;
    }
    if (buf[0] == 0x51 && buf[1] == 0x48)
        on_handshake_record(d, buf, len, now);
    else if (buf[0] == 0x51 && buf[1] == 0x50)
        on_packet(d, buf, len, now);
    else
        d->drops[PAL_DROP_BAD_MAGIC]++;
}

/* Until the client proves its address, at most 3x the bytes it sent (§8.6). */
static int amp_allows(const pal_device *d, size_t n)
{
    return d->amp_validated || d->amp_out + n <= 3u * d->amp_in;
}

size_t pal_device_output(pal_device *d, uint64_t now, uint8_t *out, size_t cap)
{
    uint8_t frames[64];
    size_t nf = 0, n;
    if (out == NULL || cap < d->cfg.mtu)
        return 0;
    if (d->last_len) { /* a final datagram goes out even after CLOSED */
        n = d->last_len;
        memcpy(out, d->last, n);
        d->last_len = 0;
        return n;
    }
    if (d->state == PAL_DEV_CLOSED)
        return 0;
    if (d->cf_ack_pending && d->rid_set) {
        d->cf_ack_pending = 0;
        return ack_record(d, MSG_CF, d->cf_seq, d->cf_len, out);
    }
    if (d->state == PAL_DEV_WAIT_FIN && d->sh_to_send) {
        uint32_t i;
        for (i = 0; i < d->sh_nrec; i++) {
            if (d->sh_to_send & (((uint64_t)1) << i)) {
                n = sh_record(d, i, out);
                if (!amp_allows(d, n))
                    return 0; /* waits for more bytes from the client */
                d->sh_to_send &= ~(((uint64_t)1) << i);
                if (!d->amp_validated)
                    d->amp_out += n;
                return n;
            }
        }
    }
    if (!d->tx_cur.live)
        return 0;
    /* Control frames due, in one packet. */
    if (d->pend_announce && d->rekey_next >= 0) {
        frames[nf] = CTRL_REKEY; frames[nf + 1] = 0; frames[nf + 2] = 0; frames[nf + 3] = 5;
        st32(frames + nf + 4, (uint32_t)d->rekey_next);
        frames[nf + 8] = REKEY_ANNOUNCE;
        nf += 9;
    }
    d->pend_announce = 0;
    if (d->pend_rekey_ack) {
        frames[nf] = CTRL_REKEY; frames[nf + 1] = 0; frames[nf + 2] = 0; frames[nf + 3] = 5;
        st32(frames + nf + 4, d->pend_rekey_ack_epoch);
        frames[nf + 8] = REKEY_ACK;
        nf += 9;
        d->pend_rekey_ack = 0;
    }
    if (d->pend_close_answer) {
        nf += close_frame(frames + nf, 0, 0, "", 0);
        d->pend_close_answer = 0;
    }
    if (nf) {
        d->pend_keepalive = 0;
        return seal(d, frames, nf, 0, 1, now, out);
    }
    if (d->pend_keepalive) {
        d->pend_keepalive = 0;
        return seal(d, NULL, 0, STREAM_KEEPALIVE, 0, now, out);
    }
    return 0;
}

int pal_device_next_deadline(const pal_device *d, uint64_t *deadline)
{
    uint64_t t = NO_TIME;
    if (d->state == PAL_DEV_CLOSED)
        return 0;
    t = min64(t, d->hs_deadline);
    t = min64(t, d->ack_deadline);
    if (d->flight_running)
        t = min64(t, d->flight_deadline);
    t = min64(t, d->drain_deadline);
    t = min64(t, d->close_resend_at);
    t = min64(t, d->rekey_deadline);
    if (d->rx_cur.live) {
        t = min64(t, epochs_deadline(d));
        if (d->state == PAL_DEV_ESTABLISHED || d->state == PAL_DEV_CLOSING)
            t = min64(t, d->last_recv + d->cfg.idle_timeout_ms);
        if (d->state == PAL_DEV_ESTABLISHED) {
            t = min64(t, d->last_send + d->cfg.keepalive_ms);
            if (d->rekey_next < 0) /* the age trigger waits while a rekey runs */
                t = min64(t, d->epoch_started + d->cfg.rekey_after_ms);
            else /* and a running rekey has a budget */
                t = min64(t, d->rekey_started + rekey_budget(d));
        }
    }
    if (t == NO_TIME)
        return 0;
    *deadline = t;
    return 1;
}

static void close_resend(pal_device *d, uint64_t now)
{
    /* The initiator resends its close every third of the drain time (§10). */
    d->close_resend_at = now + d->cfg.close_drain_ms / 3u;
}

/* The handshake ran out of time. In WAIT_FIN the client may still wait for our ack of its
 * Finished: tell it the half-open session is gone, ErrorSessionExpired under the session RID
 * within the anti-amplification budget, as the Python server does (§8.6). Locally it remains
 * a handshake timeout. */
static void expire_handshake(pal_device *d, const char *why, size_t why_len, uint64_t now)
{
    static const char detail[] = "handshake expired before the client finished it";
    int tell = d->state == PAL_DEV_WAIT_FIN && d->rid_set;
    fail_n(d, E_HS_TIMEOUT, why, why_len, 0, NULL, now);
    if (tell && amp_allows(d, HS_OVERHEAD + 4u + sizeof detail - 1u)) {
        error_response(d, E_SESSION_EXPIRED, detail, sizeof detail - 1u, d->rid);
        if (!d->amp_validated)
            d->amp_out += d->last_len;
    }
}

void pal_device_handle_timer(pal_device *d, uint64_t now)
{
    if (d->state == PAL_DEV_CLOSED)
        return;
    if (d->hs_deadline != NO_TIME && now >= d->hs_deadline) {
        expire_handshake(d, LIT("handshake timed out"), now);
        return;
    }
    if (d->ack_deadline != NO_TIME && now >= d->ack_deadline) {
        d->ack_deadline = NO_TIME;
        if (d->r_active && !d->r_done && d->rid_set == (d->r_type == MSG_CF)) {
            /* Acks for CH go out under the hello RID, for CF under the session RID. */
            uint8_t save[PAL_DEVICE_RID_LEN];
            memcpy(save, d->rid, sizeof save);
            if (d->r_type == MSG_CH)
                memcpy(d->rid, d->hello_rid, sizeof save);
            d->last_len = (uint16_t)ack_record(d, d->r_type, d->r_seq, 0, d->last);
            memcpy(d->rid, save, sizeof save);
        }
    }
    if (d->flight_running && now >= d->flight_deadline) {
        if (d->attempts >= MAX_RESENDS) {
            expire_handshake(d, LIT("no answer to the handshake"), now);
            return;
        }
        d->attempts++;
        d->rto = min32(d->rto * 2u, max32(d->cfg.max_rto_ms, d->rto_floor));
        flight_arm(d, now);
        d->flight_sent_at = now;
        d->sh_to_send |= sh_unacked_mask(d);
    }
    if (d->drain_deadline != NO_TIME && now >= d->drain_deadline) {
        d->drain_deadline = NO_TIME;
        finish_close(d);
        return;
    }
    if (d->close_resend_at != NO_TIME && now >= d->close_resend_at) {
        if (d->state == PAL_DEV_CLOSING && !d->close_by_peer) {
            d->pend_close_answer = 0;
            d->close_resend_at = now + d->cfg.close_drain_ms / 3u;
            /* resend our own close frame */
            {
                uint8_t frame[8u + PAL_DEVICE_MAX_REASON];
                size_t nf = close_frame(frame, d->close_code, 0, d->close_reason,
                                        d->close_reason_len);
                size_t m = seal(d, frame, nf, 0, 1, now, d->last);
                d->last_len = (uint16_t)m;
            }
        } else {
            d->close_resend_at = NO_TIME;
        }
    }
    if (d->rekey_deadline != NO_TIME && now >= d->rekey_deadline) {
        /* Reported in every state, so serviced in every state; a rekey only goes on while
         * established, elsewhere its timer just stops. */
        if (d->state == PAL_DEV_ESTABLISHED && d->rx_cur.live && d->rekey_next >= 0)
            rekey_retransmit(d, now);
        else
            d->rekey_deadline = NO_TIME;
    }
    if (!d->rx_cur.live)
        return;
    if (epochs_poll(d, now, 1)) {
        rekey_abandoned(d, now);
        if (d->state == PAL_DEV_CLOSED)
            return;
    }
    after_epoch_activity(d, now);
    if (d->state == PAL_DEV_ESTABLISHED || d->state == PAL_DEV_CLOSING) {
        if (now >= d->last_recv + d->cfg.idle_timeout_ms) {
            fire(d, EV_IDLE);
            d->close_code = E_IDLE;
            d->close_by_peer = 0;
            set_reason(d, LIT("idle timeout: peer silent"));
            teardown(d);
            emit_closed(d);
            return;
        }
    }
    if (d->state != PAL_DEV_ESTABLISHED)
        return;
    if (d->rekey_next >= 0 && now >= d->rekey_started + rekey_budget(d)) {
        /* Whatever the path did to it, a rekey ends in bounded time (§9). */
        fail(d, E_REKEY_TIMEOUT, "rekey did not complete", 1, NULL, now);
        return;
    }
    if (d->rekey_next < 0 && (d->tx_seq >= SEQ_REKEY_THRESHOLD
                              || d->epoch_bytes >= d->cfg.rekey_after_bytes
                              || now >= d->epoch_started + d->cfg.rekey_after_ms))
        start_rekey(d, now);
    if (now >= d->last_send + d->cfg.keepalive_ms) {
        d->pend_keepalive = 1;
        d->last_send = now; /* the keepalive is due once, whenever output runs */
    }
}

int pal_device_poll_event(pal_device *d, pal_device_event *ev)
{
    if (d->ev_count == 0)
        return 0;
    *ev = d->events[d->ev_head];
    d->ev_head = (uint8_t)((d->ev_head + 1u) % PAL_DEVICE_EVENT_QUEUE);
    d->ev_count--;
    return 1;
}

int pal_device_send(pal_device *d, uint8_t stream, const uint8_t *data, size_t len,
                    uint64_t now, uint8_t *out, size_t cap, size_t *out_len)
{
    size_t room = cap < d->cfg.mtu ? cap : d->cfg.mtu, n;
    if (d->state != PAL_DEV_ESTABLISHED && d->state != PAL_DEV_CLOSING)
        return -1;
    if (stream > 253u)
        return -1;
    if (len > room || room - len < PAL_DEVICE_PACKET_OVERHEAD)
        return -2;
    if (d->tx_seq >= SEQ_HARD_LIMIT)
        return -3;
    n = seal(d, data, len, stream, 0, now, out);
    if (n == 0)
        return -1;
    *out_len = n;
    if (d->state == PAL_DEV_ESTABLISHED && d->rekey_next < 0
        && (d->tx_seq >= SEQ_REKEY_THRESHOLD || d->epoch_bytes >= d->cfg.rekey_after_bytes))
        start_rekey(d, now);
    return 0;
}

int pal_device_close(pal_device *d, uint16_t code, const char *reason, size_t reason_len,
                     uint64_t now)
{
    if (d->state == PAL_DEV_CLOSED || d->state == PAL_DEV_CLOSING)
        return -1;
    d->close_code = code;
    d->close_by_peer = 0;
    set_reason(d, reason ? reason : "", reason ? reason_len : 0);
    if (d->state != PAL_DEV_ESTABLISHED) {
        /* No keys: nothing to drain and no authenticated way to tell the peer. */
        fire(d, EV_CLOSE);
        teardown(d);
        emit_closed(d);
        return 0;
    }
    {
        uint8_t frame[8u + PAL_DEVICE_MAX_REASON];
        size_t nf = close_frame(frame, code, 0, d->close_reason, d->close_reason_len);
        d->last_len = (uint16_t)seal(d, frame, nf, 0, 1, now, d->last);
    }
    fire(d, EV_CLOSE);
    d->rekey_deadline = NO_TIME; /* a closing session finishes no rekey */
    d->drain_deadline = now + d->cfg.close_drain_ms;
    close_resend(d, now);
    return 0;
}

int pal_device_rekey(pal_device *d, uint64_t now)
{
    if (d->state != PAL_DEV_ESTABLISHED || d->rekey_next >= 0 || d->rx_state != RX_STEADY
        || d->tx_pending.live)
        return -1;
    start_rekey(d, now);
    return d->rekey_next >= 0 ? 0 : -1;
}

void pal_device_wipe(pal_device *d)
{
    teardown(d);
    wipe(d->client_pk, sizeof d->client_pk);
    wipe(d->r_buf, sizeof d->r_buf);
    d->last_len = 0;
}

int pal_device_state(const pal_device *d) { return d->state; }
uint32_t pal_device_epoch(const pal_device *d) { return d->rx_cur.epoch; }

const char *pal_device_state_name(int state)
{
    static const char *const names[PAL_DEV_N_STATES] = {
        "S_LISTEN", "S_WAIT_CH", "S_WAIT_FIN", "S_ESTABLISHED", "S_CLOSING", "S_CLOSED"};
    return (state >= 0 && state < PAL_DEV_N_STATES) ? names[state] : "?";
}

const char *pal_device_drop_name(int reason)
{
    static const char *const names[PAL_DROP_N] = {
        "truncated", "bad-magic", "ErrorInvalidVersion", "reserved-bits", "bad-length",
        "unknown-rid", "bad-padding", "ErrorInvalidKeyPhase", "ErrorInvalidEpoch", "replay",
        "ErrorAEADDecryptFailed", "handshake-malformed", "handshake-too-large",
        "unexpected-handshake", "stale-ack", "no-keys", "closed", "malformed-control",
        "ignored-control", "unexpected-rekey", "resend-suppressed", "resumption-refused",
        "illegal-event"};
    return (reason >= 0 && reason < PAL_DROP_N) ? names[reason] : "?";
}

int pal_device_install_master(pal_device *d, const uint8_t master[32], const uint8_t rid[24],
                              uint64_t now)
{
    if (d->state != PAL_DEV_LISTEN)
        return -1;
    memcpy(d->rid, rid, PAL_DEVICE_RID_LEN);
    d->rid_set = 1;
    d->amp_validated = 1;
    if (epochs_install_master(d, master) != 0)
        return -1;
    d->state = PAL_DEV_ESTABLISHED;
    d->last_recv = d->last_send = d->epoch_started = now;
    return 0;
}

int pal_device_step_epoch_for_test(pal_device *d)
{
    /* As after a completed rekey on the receiver, with the sender just installed: key_phase
     * 1 and seq 0, which is what a peer's first packet on the new epoch carries. */
    if (epochs_arm(d, NO_TIME) != 0 || epochs_install(d) != 0)
        return -1;
    rx_commit(d);
    return 0;
}
