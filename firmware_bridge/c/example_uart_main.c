/*
 * example_uart_main.c - a device main loop on a UART: the interrupt handler feeds received
 * bytes to a ring, the loop feeds pal_link, pal_link's frames feed pal_device, and what
 * pal_device produces goes back out through pal_link. Board functions (board_*) are the
 * firmware's own; everything else is this repository's C. It compiles as is
 * (tests/test_device_c.py builds it for Cortex-M4) but is an example, not a library.
 */
#include <stddef.h>
#include <stdint.h>

#include "pal_device.h"
#include "pal_link.h"

/* ---- what the board provides ------------------------------------------------------------ */
uint64_t board_millis(void);                         /* monotonic, from boot */
void board_uart_write(const uint8_t *p, size_t n);   /* blocking or DMA, whole buffer */
void board_sleep_until_interrupt(void);              /* e.g. __WFI() */
uint32_t board_boot_counter(void);                   /* incremented in flash at each boot */
extern const uint8_t device_identity_pk[PAL_MLDSA65_PK_BYTES];
extern const uint8_t device_identity_sk[];
extern const size_t device_identity_sk_len;
extern const uint8_t client_pins[][32];              /* SHA3-256 fingerprints */
extern const size_t client_pin_count;

#define MTU 512u
#define RX_RING 1024u /* power of two; holds about 90 ms of 115200 baud */

/* ---- state: one struct, in .bss (or wherever the firmware puts it) ---------------------- */
typedef struct app {
    volatile uint32_t rx_head; /* written by the ISR only */
    uint32_t rx_tail;          /* written by the loop only */
    uint8_t rx_ring[RX_RING];
    pal_link_dec_t dec;
    uint8_t dec_buf[PAL_LINK_DEC_BUF_SIZE(MTU)];
    uint8_t datagram[MTU];      /* the frame's payload, copied: the device decrypts in place */
    uint8_t out[MTU];
    uint8_t frame[PAL_LINK_ENCODED_MAX(MTU)];
    pal_device dev;             /* ~17 KiB: the session */
    pal_device_config cfg;
} app_t;

/* The ISR receives one app pointer through the firmware's usual mechanism. */
void uart_rx_isr(app_t *a, uint8_t byte)
{
    uint32_t head = a->rx_head;
    if (head - a->rx_tail < RX_RING) { /* else the byte is lost: pal_link's CRC notices */
        a->rx_ring[head & (RX_RING - 1u)] = byte;
        a->rx_head = head + 1u;
    }
}

static void send_frame(app_t *a, uint8_t channel, const uint8_t *p, size_t n)
{
    int32_t len = pal_link_encode(channel, p, n, a->frame, sizeof a->frame);
    if (len > 0)
        board_uart_write(a->frame, (size_t)len);
}

static void send_hello(app_t *a)
{
    uint8_t hello[PAL_LINK_HELLO_LEN];
    pal_link_hello_t h;
    h.version = PAL_LINK_VERSION;
    h.mtu = MTU;
    h.boot_counter = board_boot_counter();
    send_frame(a, PAL_LINK_CH_CONTROL, hello, pal_link_hello_build(hello, &h));
}

static void flush_device(app_t *a, uint64_t now)
{
    size_t n;
    while ((n = pal_device_output(&a->dev, now, a->out, sizeof a->out)) > 0)
        send_frame(a, PAL_LINK_CH_DATA, a->out, n);
}

static void handle_events(app_t *a, uint64_t now)
{
    pal_device_event ev;
    size_t n;
    while (pal_device_poll_event(&a->dev, &ev)) {
        if (ev.type == PAL_EV_DATA) {
            /* The application: here, echo. ev.data points into a->datagram. */
            if (pal_device_send(&a->dev, ev.stream, ev.data, ev.len, now, a->out,
                                sizeof a->out, &n) == 0)
                send_frame(a, PAL_LINK_CH_DATA, a->out, n);
        } else if (ev.type == PAL_EV_CLOSED) {
            /* The session is over (ev.code says why): listen for the next client. */
            flush_device(a, now); /* a final close or ErrorResponse */
            pal_device_init(&a->dev, &a->cfg, now);
        }
    }
}

static void on_control(app_t *a, const uint8_t *p, size_t n)
{
    uint32_t token;
    uint8_t pong[PAL_LINK_PING_LEN];
    if (pal_link_ctl_type(p, n) == (int)PAL_LINK_CTL_HELLO)
        send_hello(a); /* the host (re)opened the port: tell it our MTU and boot counter */
    else if (pal_link_ctl_type(p, n) == (int)PAL_LINK_CTL_PING
             && pal_link_token_parse(p, n, &token) == 0)
        send_frame(a, PAL_LINK_CH_CONTROL, pong, pal_link_pong_build(pong, token));
}

void app_main(app_t *a)
{
    uint64_t deadline;
    pal_link_frame_t f;

    a->cfg.port = NULL; /* or the crypto library's context */
    a->cfg.identity_pk = device_identity_pk;
    a->cfg.identity_sk = device_identity_sk;
    a->cfg.identity_sk_len = device_identity_sk_len;
    a->cfg.pinned = client_pins;
    a->cfg.pinned_count = client_pin_count;
    a->cfg.mtu = MTU;
    a->cfg.has_node_id = 0; /* or 1, with cfg.node_id set, behind a gateway */
    a->cfg.link_bps = 115200u; /* stretches the handshake timers to the line */
    pal_link_dec_init(&a->dec, a->dec_buf, sizeof a->dec_buf);
    pal_device_init(&a->dev, &a->cfg, board_millis());
    /* LINK.md 6.1: repeat this every second until a host HELLO arrives (not shown), and use
     * the smaller of both MTUs (pal_link_negotiate_mtu) if the host announces less. */
    send_hello(a);

    for (;;) {
        uint64_t now = board_millis();
        while (a->rx_tail != a->rx_head) {
            uint8_t byte = a->rx_ring[a->rx_tail & (RX_RING - 1u)];
            a->rx_tail++;
            if (!pal_link_dec_push(&a->dec, byte, &f))
                continue;
            if (f.channel == PAL_LINK_CH_DATA && f.len <= sizeof a->datagram) {
                size_t i;
                for (i = 0; i < f.len; i++)
                    a->datagram[i] = f.payload[i];
                pal_device_input(&a->dev, a->datagram, f.len, now);
                handle_events(a, now);
                flush_device(a, now);
            } else if (f.channel == PAL_LINK_CH_CONTROL) {
                on_control(a, f.payload, f.len);
            }
        }
        if (pal_device_next_deadline(&a->dev, &deadline) && board_millis() >= deadline) {
            now = board_millis();
            pal_device_handle_timer(&a->dev, now);
            handle_events(a, now);
            flush_device(a, now);
        }
        board_sleep_until_interrupt(); /* the UART ISR and a timer tick wake the loop */
    }
}
